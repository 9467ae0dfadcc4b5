"""Selective scan (Mamba), optionally with per-token modality parameters."""
from momoe.ops.selective_scan.naive import selective_scan, selective_state_update

__all__ = ["selective_scan", "selective_state_update"]
