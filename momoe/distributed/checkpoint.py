"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards in
parallel, and a checkpoint loads on any number of ranks under any strategy (DCP reshards on load).

```
<dir>/.metadata, __<rank>_<i>.distcp   DCP: model tensors as "model.<name>", optimizer state as
                                       "optim.<name>.<state>" (e.g. exp_avg), at their global shapes
<dir>/config.json                      the model's config (consolidate builds the model from it)
<dir>/optimizer.json                   the optimizer's param_groups (hyperparameters, parameter names)
<dir>/state.json                       the caller's JSON state (step, data position, ...)
```

Names are the plain model's (no "module." of DDP), shapes the global ones: FSDP2's DTensors are saved
as the shards they are, and an expert-parallel bank (`ExpertParallelFFN`, which holds several blocks of
the global bank's rows) as its blocks at their global rows, by the planners below. So a checkpoint
written under DDP, FSDP2 or EP on N ranks loads under any of them on M ranks, or on one process, and
`consolidate` turns it into config.json + model.safetensors for `momoe.from_pretrained`.

The checkpoint is written into `<dir>.tmp` and renamed into place by rank 0 once every rank has
written (the directory must be on a file system every rank sees); a failure leaves the previous
`<dir>` as it was. Tensors go through DCP; everything else is JSON (DCP's own .metadata index is a
pickle, read by torch).
"""
import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from momoe.checkpoint import CONFIG_NAME, CheckpointError, load_json, save_json
from momoe.distributed.expert_parallel import expert_parallel_modules
from momoe.distributed.parallel import is_main_process, unwrap_model

OPTIMIZER_NAME = "optimizer.json"
STATE_NAME = "state.json"
METADATA_NAME = ".metadata"


@dataclasses.dataclass
class RowShards:
    """Rows of a global tensor held by this rank as blocks of one local tensor.

    local: `[R_loc, ...]`; blocks: (first local row, first global row, rows) of each block; global_rows:
    rows of the global tensor (its other dimensions are local's)."""

    local: torch.Tensor
    blocks: List[Tuple[int, int, int]]
    global_rows: int

    @property
    def global_size(self) -> torch.Size:
        return torch.Size((self.global_rows,) + tuple(self.local.shape[1:]))

    def chunks(self) -> List[ChunkStorageMetadata]:
        zeros = (0,) * (self.local.dim() - 1)
        return [ChunkStorageMetadata(offsets=torch.Size((start,) + zeros),
                                     sizes=torch.Size((rows,) + tuple(self.local.shape[1:])))
                for _, start, rows in self.blocks]

    def block(self, offsets: torch.Size) -> torch.Tensor:
        """The local rows of the block starting at global offsets (a view: loading writes in place)."""
        for local, start, rows in self.blocks:
            if offsets[0] == start:
                return self.local[local:local + rows]
        raise ValueError(f"momoe: no block of these row shards starts at global row {offsets[0]}")

    def write_items(self, key: str) -> List[WriteItem]:
        properties = TensorProperties.create_from_tensor(self.local)
        return [WriteItem(index=MetadataIndex(key, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.global_size))
                for chunk in self.chunks()]


class _RowShardSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, plus the blocks of row shards (kept out of the state dict)."""

    def __init__(self, shards: Mapping[str, RowShards]) -> None:
        super().__init__()
        self.shards = shards

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [item for key, shards in self.shards.items() for item in shards.write_items(key)]
        self.plan = dataclasses.replace(plan, items=plan.items + items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.shards:
            return self.shards[index.fqn].block(index.offset)
        return super().lookup_object(index)


class _RowShardLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, plus reads into the blocks of row shards (resharded as needed)."""

    def __init__(self, shards: Mapping[str, RowShards]) -> None:
        super().__init__()
        self.shards = shards

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = [item for key, shards in self.shards.items()
                 for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                              shards.chunks())]
        return dataclasses.replace(plan, items=plan.items + items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.shards:
            return self.shards[index.fqn].block(index.offset)
        return super().lookup_tensor(index)


def _state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The model's and the optimizer's state dicts under the plain model's names, in DCP's sharded form
    (an optimizer without state yet gets it initialised, as DCP needs a template to load into)."""
    if optimizer is None:
        return get_model_state_dict(model), {}
    return get_state_dict(model, [optimizer])


def _flatten(model: nn.Module, model_state: Mapping[str, Any], optim_state: Mapping[str, Any]
             ) -> Tuple[Dict[str, torch.Tensor], Dict[str, RowShards]]:
    """What DCP sees: {"model.<name>" / "optim.<name>.<state>": tensor or DTensor}, and apart from them
    the expert-parallel banks (and their optimizer state) as RowShards."""
    banks = {f"{name}.{p}": bank for name, bank in expert_parallel_modules(unwrap_model(model)) for p in ("w13", "w2")}
    flat: Dict[str, torch.Tensor] = {}
    shards: Dict[str, RowShards] = {}

    def add(key: str, name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"momoe: {key} is a {type(value).__name__}; distributed checkpoints hold tensors only")
        if name in banks and value.dim() > 0:
            shards[key] = RowShards(value, banks[name].row_blocks(), banks[name].num_experts)
        else:
            flat[key] = value

    for name, value in model_state.items():
        add(f"model.{name}", name, value)
    for name, states in optim_state.get("state", {}).items():
        for state_name, value in states.items():
            add(f"optim.{name}.{state_name}", name, value)
    return flat, shards


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save / load without a process group, which is what we ask for then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _check_json(obj: Any, what: str) -> None:
    """Raise on every rank alike if obj is not JSON (rank 0 failing alone when it writes the file would
    leave the other ranks waiting)."""
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as error:
        raise ValueError(f"momoe: {what} must be JSON-serialisable for a distributed checkpoint ({error})") from None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_distributed(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                     state: Optional[Mapping[str, Any]] = None) -> None:
    """Write a distributed checkpoint of `model` (+ `optimizer`, + a JSON `state`) into folder `path`.

    Collective: every rank of the job calls it. Works without a process group too (one process).

    Args:
        path (str): the checkpoint folder (replaced if it exists).
        model (nn.Module): the model as trained (plain, DDP-wrapped, FSDP2-sharded or expert-parallel).
        optimizer (Optimizer): its optimizer, or None.
        state (Mapping): JSON-serialisable training state (step, data position, ...), or None.
    """
    model_state, optim_state = _state_dicts(model, optimizer)
    flat, shards = _flatten(model, model_state, optim_state)
    state = dict(state or {})
    _check_json(state, "state")
    _check_json(optim_state.get("param_groups", []), "the optimizer's param_groups")
    tmp = path.rstrip("/") + ".tmp"
    if is_main_process() and os.path.exists(tmp):
        shutil.rmtree(tmp)
    _barrier()
    with _single_process_quiet():
        dcp.save(flat, checkpoint_id=tmp, planner=_RowShardSavePlanner(shards), no_dist=not dist.is_initialized())
    if is_main_process():
        save_json(unwrap_model(model).config.to_dict(), os.path.join(tmp, CONFIG_NAME))
        if optimizer is not None:
            save_json({"param_groups": optim_state["param_groups"]}, os.path.join(tmp, OPTIMIZER_NAME))
        save_json(state, os.path.join(tmp, STATE_NAME))
        _replace(tmp, path)
    _barrier()


def _replace(tmp: str, path: str) -> None:
    """Rename the folder tmp to path, replacing an existing path."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def _saved_tensors(path: str, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """{key: storage metadata} of the tensors of checkpoint `path`, with clear errors for a folder that
    is no checkpoint, or has no optimizer state when one is to be loaded."""
    if not os.path.isfile(os.path.join(path, METADATA_NAME)):
        raise CheckpointError(f"momoe: {path} is not a distributed checkpoint (no {METADATA_NAME})")
    if optimizer is not None and not os.path.isfile(os.path.join(path, OPTIMIZER_NAME)):
        raise CheckpointError(f"momoe: {path} was saved without optimizer state (no {OPTIMIZER_NAME})")
    return dcp.FileSystemReader(path).read_metadata().state_dict_metadata


def _drop_stateless(optim_state: Dict[str, Any], saved: Mapping[str, Any]) -> None:
    """Leave out of the optimizer template the parameters that had no state when saved (never stepped:
    e.g. MoMa's auxiliary routers before their own stage); they load with no state, as they were."""
    for name in [n for n, states in optim_state.get("state", {}).items()
                 if not any(f"optim.{n}.{k}" in saved for k in states)]:
        del optim_state["state"][name]


def _check_against(path: str, saved: Mapping[str, Any], flat: Mapping[str, torch.Tensor],
                   shards: Mapping[str, RowShards]) -> None:
    """Clear errors for tensors the checkpoint lacks or holds at another shape."""
    wanted = {**{key: t.shape for key, t in flat.items()}, **{key: s.global_size for key, s in shards.items()}}
    missing = sorted(key for key in wanted if key not in saved)
    wrong = [f"{key}: saved {tuple(saved[key].size)}, expected {tuple(shape)}" for key, shape in sorted(wanted.items())
             if key in saved and tuple(getattr(saved[key], "size", ())) != tuple(shape)]
    if missing or wrong:
        raise CheckpointError(f"momoe: {path} does not match the model/optimizer: "
                              + "; ".join(([f"missing {missing[:8]}"] if missing else []) + wrong[:8]))


def load_distributed(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                     no_dist: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by `save_distributed` into `model` (+ `optimizer`), in place.

    The model may be wrapped or sharded differently, and the job may have a different number of ranks,
    than when it was saved. Collective (every rank calls it) unless `no_dist`.

    Args:
        path (str): the checkpoint folder.
        model (nn.Module): the model (any strategy), with the saved config.
        optimizer (Optimizer): an optimizer over the model's parameters, to load its state; None: the
            model only.
        no_dist (bool): load on this process alone, even inside a job.

    Returns:
        The JSON `state` saved with the checkpoint.
    """
    saved = _saved_tensors(path, optimizer)
    model_state, optim_state = _state_dicts(model, optimizer)
    _drop_stateless(optim_state, saved)
    flat, shards = _flatten(model, model_state, optim_state)
    _check_against(path, saved, flat, shards)
    with _single_process_quiet():
        dcp.load(flat, checkpoint_id=path, planner=_RowShardLoadPlanner(shards),
                 no_dist=no_dist or not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, model_state)
    else:
        optim_state["param_groups"] = load_json(os.path.join(path, OPTIMIZER_NAME))["param_groups"]
        # strict=False lets the parameters _drop_stateless left out load with no state (the rest was checked)
        set_state_dict(model, [optimizer], model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(strict=False))
    return load_json(os.path.join(path, STATE_NAME))


def consolidate(dcp_dir: str, out_dir: str) -> str:
    """Turn a distributed checkpoint into a plain momoe checkpoint (config.json + model.safetensors).

    Runs on one process (no process group needed, the whole model in its memory); the result loads with
    `momoe.from_pretrained(out_dir)`. The optimizer state is left out.

    Returns:
        out_dir.
    """
    from momoe.models import build_model, config_from_dict

    data = load_json(os.path.join(dcp_dir, CONFIG_NAME))
    model = build_model(config_from_dict(data))
    load_distributed(dcp_dir, model, no_dist=True)
    model.save_pretrained(out_dir)
    return out_dir
