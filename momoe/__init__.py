"""momoe: a modality-aware sparse model zoo for PyTorch."""
from momoe import ops
from momoe.ops.backend import extension_available, get_backend, require_extension, use_backend
from momoe.models import build_model, count_parameters, flops_per_token, from_pretrained, list_cards, load_card, upcycle

__version__ = "0.1.0"

if get_backend() == "kernel":
    require_extension()

__all__ = [
    "ops",
    "extension_available",
    "get_backend",
    "use_backend",
    "build_model",
    "count_parameters",
    "flops_per_token",
    "from_pretrained",
    "list_cards",
    "load_card",
    "upcycle",
    "__version__",
]
