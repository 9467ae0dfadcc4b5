"""torch.ops.momoe: compiled ops with pure-PyTorch references (see momoe/ops/<op>/naive.py)."""
from momoe.ops.backend import extension_available, get_backend, use_backend

__all__ = ["extension_available", "get_backend", "use_backend"]
