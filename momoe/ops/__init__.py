"""torch.ops.momoe: compiled ops with pure-PyTorch references (see momoe/ops/<op>/naive.py)."""
from momoe.ops.backend import extension_available, get_backend, use_backend
from momoe.ops.grouped_gemm import grouped_gemm
from momoe.ops.permute import gather_rows, scatter_rows, sort_by_group
from momoe.ops.selective_scan import selective_scan, selective_state_update

__all__ = [
    "extension_available",
    "get_backend",
    "use_backend",
    "grouped_gemm",
    "sort_by_group",
    "gather_rows",
    "scatter_rows",
    "selective_scan",
    "selective_state_update",
]
