"""Process groups, the device mesh, and wrapping a model for data, fully sharded or expert parallelism.

    info = init_distributed()                     # torchrun's RANK, WORLD_SIZE, ... (one process without them)
    mesh = init_mesh(ep_size=2)                   # (dp, ep) over all ranks
    model = wrap_model(momoe.build_model(cfg).to(info.device), "ep", mesh)
    loader = PackedLoader(data, B, L, rank=info.rank, world_size=info.world_size)   # every rank its own rows

Strategies (`wrap_model`):

- "ddp": DistributedDataParallel over all ranks: every rank holds the whole model, gradients are
  averaged (all-reduce) during the backward.
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) over all ranks: each block of `model.layers`
  is one unit (its parameters all-gathered for its forward and backward, its gradients reduce-scattered),
  then the root (embedding, final norm, LM head). Parameters become DTensors sharded on dim 0.
- "ep": expert parallelism for MoMa (`apply_expert_parallel`) over the mesh's "ep" dimension, the
  other parameters replicated with DDP over all ranks; the expert shards' gradients are averaged over
  the "dp" dimension by hooks (`average_expert_gradients`).
- "fsdp" on a mesh with ep > 1: the experts sharded over "ep" as under "ep", every other parameter
  sharded by FSDP2 over all ranks (the expert banks are FSDP2's ignored parameters).

With every strategy each rank reads its own share of the data and the loss is each rank's mean; the
gradients are the mean over ranks (DDP semantics), which is the gradient of the mean loss over the
global batch when the ranks have equal numbers of targets. Batch-level routing decisions (MoMa's
expert choice, MoD's top-k) see each rank's batch under "ddp" and "fsdp", and the whole EP group's
batch under "ep".

Failures: `init_distributed` sets a timeout on every collective (`timeout_s`, MOMOE_DIST_TIMEOUT,
600 s by default), so a rank that dies or stops answering makes the others fail with an error after
at most that long instead of waiting forever (torchrun also stops the other workers once one has
failed).
"""
import contextlib
import dataclasses
import datetime
import os
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from momoe.distributed.expert_parallel import apply_expert_parallel, average_expert_gradients, expert_parallel_modules

STRATEGIES = ("ddp", "fsdp", "ep")
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "MOMOE_DIST_TIMEOUT"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: its global rank, the number of ranks, its rank on its node, and the
    device it computes on (cuda:LOCAL_RANK with NCCL, else the CPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"momoe: the environment variable {name} is not set (torchrun sets it)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"momoe: the environment variable {name} must be an integer, got {value!r}") from None


def _timeout(timeout_s: Optional[float]) -> datetime.timedelta:
    if timeout_s is None:
        value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(value)
        except ValueError:
            raise ValueError(f"momoe: {TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if timeout_s <= 0:
        raise ValueError(f"momoe: the collective timeout must be positive, got {timeout_s} s")
    return datetime.timedelta(seconds=timeout_s)


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> DistributedInfo:
    """Join the job torchrun describes, or stand alone.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (MASTER_ADDR and MASTER_PORT are read by torch's env://
    rendezvous). Without WORLD_SIZE (a plain `python` run) it starts no process group and returns rank 0
    of 1; if a process group exists already, it describes it.

    Args:
        backend (str): "nccl" or "gloo"; None: NCCL when CUDA is available (each rank on cuda:LOCAL_RANK),
            else gloo on the CPU.
        timeout_s (float): how long a collective waits for the other ranks before raising; None:
            MOMOE_DIST_TIMEOUT or 600 s.

    Returns:
        DistributedInfo(rank, world_size, local_rank, device).
    """
    timeout = _timeout(timeout_s)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        return DistributedInfo(rank, world_size, local_rank, _device(dist.get_backend(), local_rank))
    if "WORLD_SIZE" not in os.environ:
        return DistributedInfo(0, 1, 0, torch.device("cpu"))
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"momoe: RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world_size}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"momoe: backend must be 'nccl' or 'gloo', got {backend!r}")
    device = _device(backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return DistributedInfo(rank, world_size, local_rank, device)


def _device(backend: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def destroy_distributed() -> None:
    """Leave the process group (nothing to do without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or a process without a process group: the one that logs and writes shared files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def init_mesh(ep_size: int = 1) -> DeviceMesh:
    """The 2-D device mesh ("dp", "ep") over all ranks: ep_size consecutive ranks form an expert-parallel
    group (on one node when ep_size divides the processes per node), the world_size / ep_size groups are
    data-parallel replicas of each other. ep_size 1: plain data parallelism over "dp"."""
    if not dist.is_initialized():
        raise ValueError("momoe: init_mesh needs a process group: call init_distributed() under torchrun first")
    world_size = dist.get_world_size()
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"momoe: ep_size must divide the {world_size} ranks, got {ep_size}")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))


def wrap_model(model: nn.Module, strategy: str, mesh: Optional[DeviceMesh] = None) -> nn.Module:
    """Prepare `model` (identical on every rank, already on its device) for training over all ranks.

    Args:
        model (nn.Module): a momoe model; for "fsdp" its blocks are `model.layers`.
        strategy (str): "ddp", "fsdp" or "ep" (see the module docstring).
        mesh (DeviceMesh): from `init_mesh`; None: `init_mesh(1)`. "ddp" needs its "ep" dimension to
            be 1; "ep" and "fsdp" shard the experts over it when it is larger.

    Returns:
        The model to train: a DistributedDataParallel wrapper ("ddp", "ep"; the model is its `.module`)
        or the model itself, sharded in place ("fsdp"). Build the optimizer from its parameters afterwards.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"momoe: unknown parallel strategy {strategy!r}; choose one of {STRATEGIES}")
    mesh = init_mesh(1) if mesh is None else mesh
    if mesh.mesh_dim_names != ("dp", "ep"):
        raise ValueError(f"momoe: wrap_model needs a ('dp', 'ep') mesh from init_mesh, got dims {mesh.mesh_dim_names}")
    ep_size = mesh["ep"].size()
    if strategy == "ddp" and ep_size != 1:
        raise ValueError(f"momoe: strategy 'ddp' replicates every parameter over all ranks; a mesh with "
                         f"ep = {ep_size} needs strategy 'ep' or 'fsdp'")
    experts = _shard_experts(model, mesh) if strategy == "ep" or ep_size > 1 else {}
    if strategy == "fsdp":
        every_rank = mesh["dp"] if ep_size == 1 else init_device_mesh(mesh.device_type, (mesh.size(),),
                                                                      mesh_dim_names=("dp_ep",))
        ignored = set(experts.values()) or None
        for block in getattr(model, "layers", ()):
            fully_shard(block, mesh=every_rank, ignored_params=ignored)
        fully_shard(model, mesh=every_rank, ignored_params=ignored)
        return model
    if experts:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(experts))
    device = next(model.parameters()).device
    # find_unused_parameters: some parameters take no part in a training forward (MoMa's auxiliary
    # routers and MoD predictors learn only in their own stage).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _shard_experts(model: nn.Module, mesh: DeviceMesh) -> Dict[str, nn.Parameter]:
    """Expert-parallel banks over the mesh's "ep" dimension, their gradients averaged over "dp" by hooks;
    returns {name: parameter} of the banks' parameters (what DDP / FSDP2 must leave alone)."""
    apply_expert_parallel(model, mesh["ep"].get_group())
    dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
    average_expert_gradients(model, dp_group, mesh.size())
    return {f"{name}.{p}": param for name, bank in expert_parallel_modules(model)
            for p, param in bank.named_parameters()}


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Whether the backwards inside exchange the gradients between data-parallel ranks.

    enabled (the last micro-batch of an update): as usual. Disabled (the micro-batches before it): each
    rank accumulates its gradients locally (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`,
    the expert shards' `sync_gradients = False`), and the next synchronised backward exchanges the sums,
    so an update communicates once whatever the number of micro-batches. Expert parallelism still
    sends the tokens of every micro-batch (its forward needs them). A plain model: nothing to do.

    Example::

        for i, batch in enumerate(micro_batches):
            with gradient_sync(model, enabled=i == len(micro_batches) - 1):
                model(*batch).loss.backward()
    """
    if enabled:
        yield
        return
    banks = [bank for _, bank in expert_parallel_modules(unwrap_model(model))]
    for bank in banks:
        bank.sync_gradients = False
    try:
        if isinstance(model, DistributedDataParallel):
            with model.no_sync():
                yield
        elif isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield
    finally:
        for bank in banks:
            bank.sync_gradients = True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
