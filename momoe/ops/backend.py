"""Loading of the compiled extension and the kernel/reference backend switch.

`MOMOE_BACKEND=reference` (read at import) routes every public op to its pure-PyTorch
reference in `momoe/ops/<op>/naive.py`; `use_backend("reference")` does the same for a block.
"""
import contextlib
import os
from typing import Iterator

import torch  # noqa: F401  (loads libtorch, which momoe._C links against)

BACKENDS = ("kernel", "reference")
REBUILD_HINT = "pip install --no-build-isolation -e .  (from the momoe source tree)"

try:
    from momoe import _C  # noqa: F401  (loading the library registers torch.ops.momoe)

    _EXTENSION_ERROR = None
except ImportError as error:  # the package is usable with the reference backend only
    _EXTENSION_ERROR = error


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"momoe: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_backend = _checked(os.environ.get("MOMOE_BACKEND", "kernel"))


def extension_available() -> bool:
    """True when momoe._C is built and torch.ops.momoe is registered."""
    return _EXTENSION_ERROR is None


def require_extension() -> None:
    """Raise a clear ImportError with the rebuild command when momoe._C is missing."""
    if _EXTENSION_ERROR is not None:
        raise ImportError(
            f"momoe: the compiled extension momoe._C could not be loaded ({_EXTENSION_ERROR}). "
            f"Rebuild it with: {REBUILD_HINT}, or set MOMOE_BACKEND=reference to use the "
            "pure-PyTorch references."
        ) from _EXTENSION_ERROR


def get_backend() -> str:
    return _backend


def use_reference() -> bool:
    return _backend == "reference"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily route every momoe op to `name` ("kernel" or "reference")."""
    global _backend
    previous, _backend = _backend, _checked(name)
    try:
        yield
    finally:
        _backend = previous
