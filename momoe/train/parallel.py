"""The trainer on several processes: joining torchrun's job with the strategy of `momoe train --parallel`,
sums over ranks, gradient clipping over sharded gradients, and training checkpoints written with
torch.distributed.checkpoint (a thin adapter over momoe.distributed).

    parallel = start_parallel("fsdp")          # under torchrun (or a job of one rank without it)
    trainer = Trainer(model.to(parallel.device), data, config, out_dir="runs/x", parallel=parallel)
    ...
    stop_parallel()

Checkpoints: "ddp" (and one process) writes the usual checkpoint from rank 0 (the unwrapped model, see
momoe.train.checkpointing); "fsdp" and "ep", where no rank holds the whole model, write the model and the
optimizer with `save_distributed` (every rank its shards) into the checkpoint folder, and rank 0 adds
the trainer's state (training_state.json / .safetensors) before the folder is renamed into place.
"""
import contextlib
import dataclasses
import os
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from momoe.distributed import (STRATEGIES, destroy_distributed, init_distributed, init_mesh, save_distributed,
                               unwrap_model, wrap_model)
from momoe.distributed.expert_parallel import expert_parallel_modules
from momoe.distributed.launch import free_port
from momoe.train.checkpointing import CHECKPOINTS_DIR, checkpoint_name, finish_checkpoint, prepare_checkpoints_dir


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How the trainer's model is spread over processes.

    strategy: None (one process, no process group), "ddp", "fsdp" or "ep"; rank, world_size: this process
    and the job's processes; device: where this rank computes; mesh: the ("dp", "ep") device mesh.
    """

    strategy: Optional[str] = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Optional[DeviceMesh] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """No rank holds the whole model ("fsdp", "ep"): checkpoints are distributed ones."""
        return self.strategy in ("fsdp", "ep")

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train (momoe.distributed.wrap_model; the model itself on one process)."""
        return model if self.strategy is None else wrap_model(model, self.strategy, self.mesh)


@contextlib.contextmanager
def _one_rank_environment() -> Iterator[None]:
    """torchrun's variables for a job of one rank on a free local port, for the time of the rendezvous."""
    saved = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_parallel(strategy: Optional[str] = None, ep_size: int = 1, device: Optional[str] = None) -> Parallel:
    """Join the job torchrun describes (WORLD_SIZE > 1, strategy None meaning "ddp"), or a job of one rank
    when a strategy is given without torchrun; otherwise stay one plain process (Parallel()).

    Args:
        strategy (str): "ddp", "fsdp", "ep" or None.
        ep_size (int): ranks per expert-parallel group ("ep", or "fsdp" with MoMa's experts sharded over
            EP groups and the rest over all ranks).
        device (str): "cpu" (gloo) or "cuda" (NCCL, each rank on cuda:LOCAL_RANK); None: CUDA when available.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"momoe: unknown parallel strategy {strategy!r}; choose one of {STRATEGIES}")
    if ep_size != 1 and strategy not in ("ep", "fsdp"):
        raise ValueError(f"momoe: an expert-parallel size ({ep_size}) needs the 'ep' or 'fsdp' strategy")
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not world_size.isdigit():
        raise ValueError(f"momoe: the environment variable WORLD_SIZE must be an integer, got {world_size!r}")
    if strategy is None and int(world_size) <= 1:
        return Parallel()
    backend = None if device is None else ("gloo" if torch.device(device).type == "cpu" else "nccl")
    with _one_rank_environment() if "WORLD_SIZE" not in os.environ else contextlib.nullcontext():
        info = init_distributed(backend)
    try:
        mesh = init_mesh(ep_size)
    except BaseException:
        destroy_distributed()
        raise
    return Parallel(strategy or "ddp", info.rank, info.world_size, info.device, mesh)


def stop_parallel() -> None:
    """Leave the process group, if any (call it in a `finally`, so a failing rank does not linger)."""
    destroy_distributed()


def sum_over_ranks(values: Sequence[float]) -> List[float]:
    """The element-wise sum of `values` over all ranks (float64; `values` itself without a process group)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def clip_gradients(model: nn.Module, params: Sequence[nn.Parameter], max_norm: float, parallel: Parallel) -> float:
    """Clip the gradients to a global norm of max_norm (inf: no clipping); returns the norm before.

    The norm is the one of the whole model's gradient, from the squared norms of three kinds of
    gradient: replicated ones (one process, DDP) are whole and equal on every rank; FSDP2's are DTensor
    shards over all ranks, so their squares are summed over the job; an expert-parallel bank holds other
    experts on each rank of its EP group (equal over the replicas), so its squares are summed over the
    EP group.
    """
    experts = {id(p) for _, bank in expert_parallel_modules(unwrap_model(model)) for p in bank.parameters()}
    kinds: List[List[torch.Tensor]] = [[], [], []]  # replicated, FSDP2 shards (local), expert shards
    for p in params:
        if p.grad is not None:
            sharded = isinstance(p.grad, DTensor)
            kinds[1 if sharded else 2 if id(p) in experts else 0].append(p.grad.to_local() if sharded else p.grad)
    device = next((grad.device for grads in kinds for grad in grads), parallel.device)
    squares = torch.stack([torch.nn.utils.get_total_norm(grads).to(device, torch.float64) ** 2 if grads
                           else torch.zeros((), dtype=torch.float64, device=device) for grads in kinds])
    if dist.is_initialized():
        dist.all_reduce(squares[1:2])
        if experts:
            dist.all_reduce(squares[2:], group=parallel.mesh["ep"].get_group())
    norm = float(squares.sum().sqrt())
    coefficient = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s
    if coefficient < 1.0:
        for grads in filter(None, kinds):
            torch._foreach_mul_(grads, coefficient)
    return norm


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def clip_gradients(model: nn.Module, params: Sequence[nn.Parameter], max_norm: float, parallel: Parallel) -> float:
    """Clip the gradients to a global norm of max_norm (inf: no clipping); returns the norm before.

    The norm is the one of the whole model's gradient, from the squares of three kinds of gradient:
    replicated ones (one process, DDP) are whole and equal on every rank; FSDP2's are DTensor shards over
    all ranks, so their squares are summed over the job; an expert-parallel bank holds other experts on
    each rank of its EP group (equal over the replicas), so its squares are summed over the EP group.
    """
    experts = {id(p) for _, bank in expert_parallel_modules(unwrap_model(model)) for p in bank.parameters()}
    squares = torch.zeros(3, dtype=torch.float64, device=parallel.device)  # replicated, FSDP2 shards, experts
    grads = [p.grad for p in params if p.grad is not None]
    for p in params:
        if p.grad is not None:
            kind = 1 if isinstance(p.grad, DTensor) else 2 if id(p) in experts else 0
            local = p.grad.to_local() if kind == 1 else p.grad
            squares[kind] += local.detach().double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(squares[1:2])
        if experts:
            dist.all_reduce(squares[2:], group=parallel.mesh["ep"].get_group())
    norm = float(squares.sum().sqrt())
    coefficient = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s
    if coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return norm


def write_distributed_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                                 state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], keep: int = 2) -> str:
    """Checkpoint `step` of a run as a distributed checkpoint (collective: every rank calls it).

    Every rank writes its shards of the model and the optimizer (save_distributed) into a temporary
    folder; rank 0 adds the trainer's JSON `state` and `tensors` (random generators), renames the folder
    into place and points latest.json at it (momoe.train.checkpointing.finish_checkpoint). A failure
    leaves the previous checkpoint and latest.json as they were. Returns the checkpoint folder.
    """
    main = not dist.is_initialized() or dist.get_rank() == 0
    folder = prepare_checkpoints_dir(run_dir) if main else os.path.join(run_dir, CHECKPOINTS_DIR)
    tmp = os.path.join(folder, f".tmp-{checkpoint_name(step)}-dcp")
    save_distributed(tmp, model, optimizer)  # its first barrier follows rank 0's clean-up of old leftovers
    path = finish_checkpoint(run_dir, step, tmp, state, tensors, keep) if main else ""
    barrier()
    return path or os.path.join(folder, checkpoint_name(step))

