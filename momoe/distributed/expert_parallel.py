"""Expert parallelism for MoMa's modality-aware experts (`momoe.layers.modality_experts.ModalityExperts`).

Layout. The experts of every modality group are split evenly over the P ranks of an expert-parallel
(EP) group: with groups of E_0, E_1, ... experts (each divisible by P), rank p holds experts
[p E_m / P, (p + 1) E_m / P) of every group m. Every rank thus runs E_m / P experts of each modality
and, with expert choice (every expert takes exactly C_m tokens), the same number of rows. The local
bank keeps the global order restricted to its experts (group 0's first) and the parameters keep
their names: `...ffn.experts.w13` becomes this rank's `[E / P, 2F, D]` rows of the global
`[E, 2F, D]` bank (`momoe.distributed.checkpoint` saves them at their global rows).

Every rank of the EP group feeds its own tokens (its data-parallel share of the batch).

Expert choice over the group's batch (`ExpertParallelRouter`). MoMa picks each expert's top-C tokens
over the whole batch of the modality; here that batch is the union of the EP ranks' tokens. Each rank
computes the router scores of its own tokens, the scores (T_p x E_m floats, not the activations) are
all-gathered in rank order, and every rank runs the same top-k on the same `[T, E_m]` matrix, so all
ranks reach the same decisions with no further message. Each keeps the (token, expert) pairs of its own
tokens and takes their gates from its own scores, so the router's gradient stays local. The result is
the single-process layer on the concatenation of the ranks' batches (rank 0's rows first). Gumbel
noise, when on, is drawn by each rank for its own tokens before the gather.

Dispatch and combine (`ExpertParallelFFN.forward`, given the routed rows grouped by global expert as
`run_experts` passes them to the bank):

1. the rows are put in (destination rank, local expert) order: `sort_by_group` + `gather_rows`;
2. the row counts per (rank, local expert) are exchanged with `all_to_all_single`, then the rows;
3. the received rows (grouped by source rank, then expert) are regrouped by local expert
   (`sort_by_group`, `gather_rows`), run through the local experts (two grouped GEMMs,
   `ExpertFFN.forward`) and put back in the received order (`scatter_rows`);
4. the outputs go back along the reverse splits and into the global-expert order (`scatter_rows`);
   `run_experts` then sums them into their tokens weighted by the gates.

Everything is differentiable; the backward of an all_to_all is the all_to_all along the reverse
splits, so each expert shard's gradient sums the contributions of the tokens of every EP rank.

Training the auxiliary routers (`train_aux_routers`): their BCE against the group's decisions is
normalised by the group's token count (`ExpertParallelRouter.aux_router_loss`), so the mean over the
ranks equals the single-process loss on the group's batch.

Token-choice groups (`routing="token_choice"`) and causal routing (the auxiliary routers) decide per
token, so only the bank is sharded; a token-choice load-balancing loss is then over each rank's
tokens.

Shape legend: T tokens, D d_model, F d_ff, E experts of all groups, P ranks of the EP group,
E_loc = E / P experts held here, R rows, C capacity.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from momoe.distributed.collectives import all_gather_rows, all_to_all_counts, all_to_all_rows
from momoe.layers.experts import ExpertFFN
from momoe.layers.modality_experts import ModalityExperts
from momoe.layers.routers import (ExpertChoiceRouter, RouterStats, SortedRouting, check_rows, gumbel_like,
                                  router_logits)
from momoe.ops import gather_rows, scatter_rows, sort_by_group


def local_expert_blocks(experts_per_modality: Sequence[int], ep_size: int, ep_rank: int) -> List[Tuple[int, int]]:
    """The experts rank `ep_rank` of `ep_size` holds: one (first global expert, count) block per group.

    Example::

        >>> local_expert_blocks([4, 2], ep_size=2, ep_rank=1)   # bank [t0 t1 t2 t3 i0 i1]
        [(2, 2), (5, 1)]                                        # t2 t3 and i1
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"momoe: ep_rank must be in [0, ep_size), got ep_rank {ep_rank}, ep_size {ep_size}")
    if any(e % ep_size for e in experts_per_modality):
        raise ValueError(f"momoe: expert parallelism over {ep_size} ranks needs every modality group's number of "
                         f"experts to be divisible by {ep_size}, got experts_per_modality {list(experts_per_modality)}")
    blocks, start = [], 0
    for e in experts_per_modality:
        n = e // ep_size
        blocks.append((start + ep_rank * n, n))
        start += e
    return blocks


def _slot_of_expert(experts_per_modality: Sequence[int], ep_size: int) -> torch.Tensor:
    """(E,) int64: the position of every global expert in the (owner rank, local expert) order."""
    per_rank = sum(experts_per_modality) // ep_size
    slots, local_start = [], 0
    for e in experts_per_modality:
        n = e // ep_size
        slots += [(i // n) * per_rank + local_start + i % n for i in range(e)]
        local_start += n
    return torch.tensor(slots, dtype=torch.int64)


class ExpertParallelFFN(ExpertFFN):
    """This rank's shard of an `ExpertFFN` bank, dispatching the rows to the ranks that own their experts.

    A drop-in replacement for the bank of a `ModalityExperts` layer: it takes the rows of every global
    expert (grouped by global expert, as `run_experts` passes them) and returns their outputs in the same
    order, running only its own experts. `num_experts` is the global bank size E (what the routers index);
    `w13` `[E_loc, 2F, D]` and `w2` `[E_loc, D, F]` hold this rank's experts, rows `blocks` of the global
    bank. `sent_bytes` counts the bytes this rank's forwards sent to other ranks (dispatch and combine;
    the backward sends as many again); reset it at will. `sync_gradients`: whether the backward
    all-reduces the shard's gradient over its data-parallel replicas (`average_expert_gradients`).

    Args:
        bank (ExpertFFN): the full bank (identical on every rank); its rows are copied.
        experts_per_modality: the groups of the bank, e.g. ``[4, 4]`` (each divisible by the group size).
        group (ProcessGroup): the expert-parallel group.
    """

    slot_of_expert: torch.Tensor

    def __init__(self, bank: ExpertFFN, experts_per_modality: Sequence[int], group: ProcessGroup) -> None:
        ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        blocks = local_expert_blocks(experts_per_modality, ep_size, ep_rank)
        if sum(experts_per_modality) != bank.num_experts:
            raise ValueError(f"momoe: experts_per_modality {list(experts_per_modality)} does not add up to the "
                             f"bank's {bank.num_experts} experts")
        super().__init__(bank.d_model, bank.d_ff, sum(n for _, n in blocks))
        rows = torch.cat([torch.arange(start, start + n) for start, n in blocks]).to(bank.w13.device)
        self.w13 = nn.Parameter(bank.w13.detach()[rows].clone(), requires_grad=bank.w13.requires_grad)
        self.w2 = nn.Parameter(bank.w2.detach()[rows].clone(), requires_grad=bank.w2.requires_grad)
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        self.num_local_experts = self.num_experts  # what ExpertFFN counted: the experts held here
        self.num_experts = bank.num_experts  # the global bank, as the routers and run_experts see it
        self.blocks = blocks
        self.register_buffer("slot_of_expert", _slot_of_expert(experts_per_modality, ep_size).to(bank.w13.device),
                             persistent=False)
        self.sent_bytes = 0
        self.sync_gradients = True  # see average_expert_gradients

    def row_blocks(self) -> List[Tuple[int, int, int]]:
        """(first local row, first global row, rows) of each block of w13 / w2 in the global bank."""
        out, local = [], 0
        for start, n in self.blocks:
            out.append((local, start, n))
            local += n
        return out

    def forward(self, x_sorted: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Run every row through its expert, wherever the expert lives.

        Args:
            x_sorted (Tensor): rows of shape `[R, D]` grouped by global expert (expert 0's rows first).
            sizes (Tensor): rows per global expert, shape `[E]`, integer, summing to R.

        Returns:
            Tensor of shape `[R, D]` in the order of x_sorted.
        """
        if sizes.shape != (self.num_experts,):
            raise ValueError(f"momoe: sizes must have shape ({self.num_experts},) (one per global expert), "
                             f"got {tuple(sizes.shape)}")
        P, E_loc = self.ep_size, self.num_local_experts
        slots = torch.repeat_interleave(self.slot_of_expert, sizes, output_size=x_sorted.shape[0])  # [R]
        order, send_counts = sort_by_group(slots, P * E_loc)  # rows by (destination rank, local expert)
        recv_counts = all_to_all_counts(send_counts.view(P, E_loc), self.group)  # [P, E_loc] from each rank
        send_splits, recv_splits = send_counts.view(P, E_loc).sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all_rows(gather_rows(x_sorted, order), send_splits, recv_splits, self.group)
        local_expert = torch.arange(E_loc, device=sizes.device).repeat(P).repeat_interleave(recv_counts.flatten())
        by_expert, local_sizes = sort_by_group(local_expert, E_loc)
        y = super().forward(gather_rows(received, by_expert), local_sizes)
        y = scatter_rows(y, by_expert, received.shape[0])  # the received order again
        y_back = all_to_all_rows(y, recv_splits, send_splits, self.group)
        self.sent_bytes += (self._remote_rows(send_splits) * x_sorted.shape[1] * x_sorted.element_size()
                            + self._remote_rows(recv_splits) * y.shape[1] * y.element_size())
        return scatter_rows(y_back, order, x_sorted.shape[0])

    def _remote_rows(self, splits: List[int]) -> int:
        return sum(splits) - splits[self.ep_rank]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"local experts {self.blocks} of rank {self.ep_rank}/{self.ep_size}")


class ExpertParallelRouter(ExpertChoiceRouter):
    """`ExpertChoiceRouter` deciding over the tokens of every rank of an expert-parallel group.

    The router scores of the rank's tokens are all-gathered (in rank order), each expert takes its top
    C = ceil(capacity_factor * T / E) of all T tokens of the group, and the routing returned covers this
    rank's tokens only (token_index into this rank's rows; `sizes` counts them, so they may differ
    between experts and ranks). Causal routing is per token, as in `ExpertChoiceRouter`.
    """

    def __init__(self, d_model: int, num_experts: int, group: ProcessGroup, capacity_factor: float = 1.0,
                 aux_hidden: Optional[int] = None, gumbel_noise: bool = False) -> None:
        super().__init__(d_model, num_experts, capacity_factor=capacity_factor, aux_hidden=aux_hidden,
                         gumbel_noise=gumbel_noise)
        self.group = group

    @classmethod
    def from_router(cls, router: ExpertChoiceRouter, group: ProcessGroup) -> "ExpertParallelRouter":
        """The same router (weights copied, same device, dtype and mode) deciding over `group`."""
        new = cls(router.d_model, router.num_experts, group, capacity_factor=router.capacity_factor,
                  aux_hidden=router.aux_router.hidden, gumbel_noise=router.gumbel_noise)
        new.to(router.weight)
        new.load_state_dict(router.state_dict())
        return new.train(router.training)

    def forward(self, x: torch.Tensor, causal: bool = False) -> SortedRouting:
        """x: (T_p, D) this rank's tokens -> SortedRouting of this rank's (token, expert) pairs."""
        if causal:
            return super().forward(x, causal=True)
        check_rows(x, self.d_model, "x")
        logits = router_logits(x, self.weight)  # (T_p, E)
        scores = logits
        if self.training and self.gumbel_noise:
            scores = logits + gumbel_like(logits) - gumbel_like(logits)
        all_scores, counts = all_gather_rows(scores, self.group)  # (T, E), T_q per rank
        start = sum(counts[: dist.get_rank(self.group)])
        top = all_scores.t().topk(self.capacity(all_scores.shape[0]), dim=1).indices  # (E, C) tokens of the group
        mine = (top >= start) & (top < start + x.shape[0])
        expert_index, slot = mine.nonzero(as_tuple=True)  # grouped by expert
        token_index = top[expert_index, slot] - start
        stats = RouterStats.from_rows(expert_index, token_index, x.shape[0], self.num_experts)
        return SortedRouting(token_index=token_index, gates=torch.sigmoid(scores[token_index, expert_index]),
                             sizes=mine.sum(1), logits=logits, stats=stats, decided_over=all_scores.shape[0])

    def aux_router_loss(self, x: torch.Tensor, routing: SortedRouting) -> torch.Tensor:
        """This rank's part of the auxiliary routers' mean BCE over the group's T tokens, scaled by the
        group size P: `sum over this rank's (token, expert) of BCE * P / (T * E)`, so that the mean over
        the ranks (DDP's gradient averaging, the trainer's logged aux loss) is the single-process loss
        on the group's batch however the modalities' tokens are split between the ranks."""
        loss = super().aux_router_loss(x, routing)  # the mean over this rank's T_p tokens
        if routing.decided_over is None:  # causal routing: decided per token, on this rank
            return loss
        return loss * (x.shape[0] * dist.get_world_size(self.group) / routing.decided_over)


def apply_expert_parallel(model: nn.Module, group: ProcessGroup) -> nn.Module:
    """Shard the experts of every `ModalityExperts` layer of `model` over `group` (in place).

    Each layer's bank becomes an `ExpertParallelFFN` (this rank's experts of every group, same
    parameter names) and each expert-choice router an `ExpertParallelRouter`. Call it on identical
    models on every rank of the group (same initialisation or checkpoint), before building the optimizer
    and before any data-parallel wrapper (`momoe.distributed.wrap_model(model, "ep", mesh)` does both).

    Returns:
        the model.

    Example (under torchrun, 2 ranks)::

        >>> init_distributed()
        >>> model = apply_expert_parallel(momoe.build_model(cfg), dist.group.WORLD)
        >>> out = model(ids, mod, labels=ids)   # each rank its own (B, L) batch
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ModalityExperts)]
    if not layers:
        raise ValueError(f"momoe: {type(model).__name__} has no ModalityExperts layer to shard over experts")
    ep_size = dist.get_world_size(group)
    for name, layer in layers:
        if isinstance(layer.experts, ExpertParallelFFN):
            raise ValueError(f"momoe: {name} is already expert-parallel")
        local_expert_blocks(layer.experts_per_modality, ep_size, 0)  # fails before any layer changes
    for _, layer in layers:
        layer.experts = ExpertParallelFFN(layer.experts, layer.experts_per_modality, group)
        for modality, router in layer.routers.items():
            if isinstance(router, ExpertChoiceRouter):
                layer.routers[modality] = ExpertParallelRouter.from_router(router, group)
    return model


def expert_parallel_modules(model: nn.Module) -> List[Tuple[str, ExpertParallelFFN]]:
    """(name, module) of every expert-parallel bank in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelFFN)]


def average_expert_gradients(model: nn.Module, data_parallel_group: Optional[ProcessGroup], world_size: int) -> None:
    """Make every expert shard's gradient the data-parallel mean, as DDP does for replicated parameters.

    A shard's gradient already sums the contributions of the local losses of all ranks of its EP group
    (through the all_to_all backward). DDP semantics (the mean over all `world_size` ranks of their
    local-loss gradients) then need the sum over the replicas of the shard (the `data_parallel_group`,
    None when there is one replica) divided by `world_size`. A hook divides every incoming gradient by
    world_size; once it is accumulated into `.grad`, a second hook all-reduces `.grad` over the
    replicas, unless the bank's `sync_gradients` is False (gradient accumulation: set it with
    `momoe.distributed.gradient_sync`, so that the replicas exchange the summed gradient once, after the
    last micro-batch).
    """
    replicas = 1 if data_parallel_group is None else dist.get_world_size(data_parallel_group)

    def scale(grad: torch.Tensor) -> torch.Tensor:
        return grad / world_size

    def make_sync(bank: ExpertParallelFFN):
        def sync(p: torch.Tensor) -> None:
            if bank.sync_gradients:
                dist.all_reduce(p.grad, group=data_parallel_group)
        return sync

    for _, bank in expert_parallel_modules(model):
        for p in bank.parameters():
            if p.requires_grad:
                p.register_hook(scale)
                if replicas > 1:
                    p.register_post_accumulate_grad_hook(make_sync(bank))
