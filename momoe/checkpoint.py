"""Checkpoint files: safetensors weights and JSON, written atomically (temp file + rename), read with
clear errors. No pickle anywhere."""
import json
import os
import tempfile
from typing import Dict, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching the model."""


def _atomic_write(path: str, write) -> None:
    """Run write(tmp_path) on a temp file beside `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(obj: object, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


def load_json(path: str) -> Dict[str, object]:
    if not os.path.isfile(path):
        raise CheckpointError(f"momoe: {path} does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"momoe: {path} is not valid JSON ({error})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"momoe: {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors as safetensors (contiguous copies; shared storage is written once per name)."""
    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(f"momoe: {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"momoe: {path} is not a readable safetensors file ({error})") from None


def check_tensors(expected: Mapping[str, Sequence[int]], state: Mapping[str, torch.Tensor], context: str) -> None:
    """Raise CheckpointError listing missing and unexpected tensors, wrong shapes and non-float tensors
    of `state` against the expected names and shapes; `context` starts the message."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name in sorted(set(expected) & set(state)):
        got = state[name]
        if tuple(got.shape) != tuple(expected[name]):
            problems.append(f"{name} has shape {tuple(got.shape)}, expected {tuple(expected[name])}")
        elif not got.is_floating_point():
            problems.append(f"{name} has dtype {got.dtype}, expected a floating-point tensor")
    if problems:
        raise CheckpointError(f"{context}: " + "; ".join(problems))


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """check_tensors against the model's state dict."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_tensors(expected, state, f"momoe: {source} does not match the model")
