"""Tiny models, batches and training steps shared by the distributed tests (2 ranks on gloo, spawned by
the tests themselves with momoe.distributed.spawn; the functions that run on the ranks live at module
level so the spawned processes can import them)."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import momoe
from momoe.distributed import local_expert_blocks
from momoe.models import config_from_dict
from tests.models.helpers import batch, randomize

WORLD = 2
TINY = dict(vocab_size=64, d_model=32, n_layer=2, n_heads=2, d_ff=48, modalities=["text", "image"])
TOL = dict(atol=2e-5, rtol=1e-4)


def transformer_config() -> dict:
    return {"model_type": "transformer", **TINY}


def moma_config(**overrides) -> dict:
    """MoMa with unequal groups (4 text experts, 2 image experts), expert choice at capacity factor 1."""
    return {"model_type": "moma", **TINY, "experts_per_modality": [4, 2], **overrides}


def make_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """The same model on every rank and in the reference: fixed seed, randomized parameters."""
    torch.manual_seed(seed)
    return randomize(momoe.build_model(config), seed)


def global_batches(config: dict, steps: int, B: int = 4, L: int = 16) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, modality_ids) of shape (B, L) for each step: the global batch, split over the ranks by rows."""
    cfg = config_from_dict(config)
    return [batch(cfg, B=B, L=L, seed=100 + s) for s in range(steps)]


def rank_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (rank 0 the first B / WORLD rows)."""
    return t.chunk(dist.get_world_size())[dist.get_rank()]


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, mod: torch.Tensor,
         shards: int = 1) -> torch.Tensor:
    """One AdamW step on the mean of the losses of `shards` row-chunks of the batch; returns that loss."""
    loss = torch.stack([model(i, m, labels=i).loss for i, m in zip(ids.chunk(shards), mod.chunk(shards))]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def distributed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, mod: torch.Tensor) -> float:
    """A step on this rank's rows; returns the mean loss over the ranks."""
    loss = step(model, opt, rank_rows(ids), rank_rows(mod)).clone()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def full_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter whole (FSDP2's shards gathered), under the plain model's names."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def expert_rows(experts_per_modality, rank: int) -> torch.Tensor:
    """Rows of the global expert bank held by `rank` of WORLD under expert parallelism."""
    return torch.cat([torch.arange(s, s + n) for s, n in local_expert_blocks(experts_per_modality, WORLD, rank)])
