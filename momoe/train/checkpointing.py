"""Training checkpoints: the model, the optimizer, the schedule, the data position and the random
generators, written atomically; a run folder points at its latest checkpoint.

```
<run>/latest.json                    {"checkpoint": "checkpoints/step-000100", "step": 100}
<run>/checkpoints/step-000100/
    config.json  model.safetensors   the model (save_pretrained: momoe.from_pretrained loads the folder)
    training_state.safetensors       optimizer moments, random generator states (tensors)
    training_state.json              step, tokens seen, settings, schedule, loader position, the rest
```
Runs sharded over ranks (`momoe train --parallel fsdp|ep`) hold the model and the optimizer as a
torch.distributed.checkpoint instead (.metadata, *.distcp, config.json, optimizer.json, state.json:
momoe.distributed.save_distributed) beside the same training_state files; `momoe consolidate` turns
one into config.json + model.safetensors.

A checkpoint is written into a temporary folder beside its final place and renamed into place when
complete; latest.json is replaced (atomically) after that. A failure or a kill at any point leaves the
previous checkpoint and latest.json as they were. No pickle: tensors in safetensors, the rest JSON.
"""
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from momoe.checkpoint import CONFIG_NAME, CheckpointError, load_json, load_weights, save_json, save_weights
from momoe.distributed.checkpoint import METADATA_NAME
from momoe.models.modeling_utils import PreTrainedModel

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest.json"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "momoe-training-state"
STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def prepare_checkpoints_dir(run_dir: str) -> str:
    """Create run_dir/checkpoints (without the leftovers of a write that was killed); returns it."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(folder, exist_ok=True)
    for entry in os.listdir(folder):
        if entry.startswith(".tmp-"):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
    return folder


def write_checkpoint(run_dir: str, step: int, model: PreTrainedModel, state: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor], keep: int = 2) -> str:
    """Write checkpoint `step` of a run (model, JSON `state`, `tensors`), point latest.json at it and
    delete all but the `keep` most recent checkpoints. Returns the checkpoint folder."""
    folder = prepare_checkpoints_dir(run_dir)
    tmp = tempfile.mkdtemp(dir=folder, prefix=f".tmp-{checkpoint_name(step)}-")
    try:
        model.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(run_dir, step, tmp, state, tensors, keep)


def finish_checkpoint(run_dir: str, step: int, tmp: str, state: Mapping[str, Any],
                      tensors: Mapping[str, torch.Tensor], keep: int = 2) -> str:
    """Add the training state (JSON `state`, `tensors`) to the model files in `tmp` (a folder in
    run_dir/checkpoints), rename it into place as checkpoint `step`, point latest.json at it and delete
    all but the `keep` most recent checkpoints. Returns the checkpoint folder."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    name = checkpoint_name(step)
    final = os.path.join(folder, name)
    try:
        save_weights(dict(tensors), os.path.join(tmp, STATE_TENSORS))
        save_json({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, **state},
                  os.path.join(tmp, STATE_JSON))
        if os.path.exists(final):  # the same step written again (e.g. after a resume): swap it out
            old = tempfile.mkdtemp(dir=folder, prefix=f".tmp-old-{name}-")
            os.rename(final, os.path.join(old, name))
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_json({"checkpoint": f"{CHECKPOINTS_DIR}/{name}", "step": step}, os.path.join(run_dir, LATEST_FILE))
    steps = sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(folder)) if m)
    for old_step in steps[:-keep]:
        if old_step != step:
            shutil.rmtree(os.path.join(folder, checkpoint_name(old_step)), ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The folder latest.json points at, or None when the run has no checkpoint yet."""
    pointer = os.path.join(run_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    target = load_json(pointer).get("checkpoint")
    path = os.path.join(run_dir, str(target))
    if not isinstance(target, str) or not os.path.isfile(os.path.join(path, STATE_JSON)):
        raise CheckpointError(f"momoe: {pointer} points at {target!r}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str) -> str:
    """A model folder (config.json), or a run folder (latest.json) -> the model folder to load."""
    if not os.path.exists(path):
        raise CheckpointError(f"momoe: {path} does not exist")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    latest = latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise CheckpointError(f"momoe: {path} is neither a checkpoint (no {CONFIG_NAME}) nor a training run "
                              f"(no {LATEST_FILE})")
    return latest


def resolve_model(path: str) -> str:
    """resolve_checkpoint, refusing a distributed checkpoint (its model loads after `momoe consolidate`)."""
    folder = resolve_checkpoint(path)
    if is_distributed_checkpoint(folder):
        raise CheckpointError(f"momoe: {folder} is a distributed checkpoint; turn it into a model first with "
                              f"`momoe consolidate {folder} OUT_DIR`")
    return folder


def is_distributed_checkpoint(path: str) -> bool:
    """Whether checkpoint folder `path` holds its model as a torch.distributed.checkpoint."""
    return os.path.isfile(os.path.join(path, METADATA_NAME))


def read_training_state(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The JSON state and the tensors of checkpoint folder `path` (CheckpointError if absent or foreign)."""
    state = load_json(os.path.join(path, STATE_JSON))
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"momoe: {path}/{STATE_JSON} has format {state.get('format')!r} version "
                              f"{state.get('version')!r}, expected {STATE_FORMAT!r} version {STATE_VERSION}")
    return state, load_weights(os.path.join(path, STATE_TENSORS))
