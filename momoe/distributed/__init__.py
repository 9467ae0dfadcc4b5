"""Multi-process and multi-node training building blocks: process groups and the device mesh, DDP /
FSDP2 / expert-parallel wrapping, distributed checkpoints, and a local launcher.

    from momoe.distributed import init_distributed, init_mesh, wrap_model, save_distributed

- `parallel`: `init_distributed`, `init_mesh`, `wrap_model` ("ddp", "fsdp", "ep"), `gradient_sync`
  (gradient accumulation without communication), `is_main_process`.
- `expert_parallel`: MoMa's experts sharded over ranks (`apply_expert_parallel`), expert choice over
  the expert-parallel group's batch, all_to_all dispatch and combine.
- `checkpoint`: `save_distributed` / `load_distributed` with torch.distributed.checkpoint (resumable on
  another number of ranks or another strategy), `consolidate` to config.json + model.safetensors.
- `collectives`: differentiable all_to_all over rows, all-gather of rows of different lengths.
- `launch`: `spawn(fn, nprocs)`, a local multi-process job for a function (tests, benchmarks).

See docs/distributed.md for torchrun (single and multi-node) and SLURM.
"""
from momoe.distributed.checkpoint import consolidate, load_distributed, save_distributed
from momoe.distributed.expert_parallel import (ExpertParallelFFN, ExpertParallelRouter, apply_expert_parallel,
                                               average_expert_gradients, local_expert_blocks)
from momoe.distributed.launch import spawn
from momoe.distributed.parallel import (STRATEGIES, DistributedInfo, destroy_distributed, gradient_sync,
                                        init_distributed, init_mesh, is_main_process, unwrap_model, wrap_model)

__all__ = [
    "STRATEGIES",
    "DistributedInfo",
    "ExpertParallelFFN",
    "ExpertParallelRouter",
    "apply_expert_parallel",
    "average_expert_gradients",
    "consolidate",
    "destroy_distributed",
    "gradient_sync",
    "init_distributed",
    "init_mesh",
    "is_main_process",
    "load_distributed",
    "local_expert_blocks",
    "save_distributed",
    "spawn",
    "unwrap_model",
    "wrap_model",
]
