"""Random number generator states as tensors + JSON, so that a resumed run draws the same numbers.

Saved: torch's CPU generator (a uint8 tensor), each initialised CUDA device's generator, and Python's
`random` (JSON). numpy's global generator is not used by momoe (the loader seeds its own per epoch).
"""
import random
from typing import Any, Dict, Tuple

import torch

from momoe.checkpoint import CheckpointError

CPU_KEY = "rng.torch_cpu"
CUDA_PREFIX = "rng.torch_cuda."


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The current generator states: tensors (uint8) and a JSON dict."""
    tensors = {CPU_KEY: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            tensors[f"{CUDA_PREFIX}{device}"] = torch.cuda.get_rng_state(device)
    version, internal, gauss_next = random.getstate()
    return tensors, {"python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], source: str) -> None:
    """Restore states saved by rng_state (CUDA states only for devices that exist here)."""
    try:
        version, internal, gauss_next = meta["python"]
        random.setstate((version, tuple(internal), gauss_next))
        torch.set_rng_state(tensors[CPU_KEY])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"momoe: {source}: malformed random generator state ({error!r})") from None
    for key, state in tensors.items():
        if key.startswith(CUDA_PREFIX) and torch.cuda.is_available():
            device = int(key[len(CUDA_PREFIX):])
            if device < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, device)
