"""The collectives expert parallelism needs, on top of torch.distributed.

- `all_to_all_rows`: a differentiable `all_to_all_single` over rows (the backward sends the gradients
  back along the reverse splits), written as a small autograd.Function
  (torch.distributed.nn.functional's version is deprecated in torch 2.13).
- `all_to_all_counts`: the split sizes exchanged before the rows.
- `all_gather_rows`: rows of different lengths from every rank, concatenated in rank order (not
  differentiable: expert choice only gathers router scores to decide).

Shape legend: R rows, K features, P ranks of the group.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class _AllToAllRows(torch.autograd.Function):
    """out = all_to_all_single(x) with the given splits; grad_x = all_to_all_single(grad_out) with the
    splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                group: Optional[ProcessGroup]) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_x, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_x, None, None, None


def all_to_all_rows(x: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                    group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Send `send_splits[q]` consecutive rows of x to rank q; receive `recv_splits[q]` rows from rank q.

    Args:
        x (Tensor): rows of shape `[R, ...]`, grouped by destination rank (rank 0's rows first).
        send_splits, recv_splits (List[int]): P row counts each; sum(send_splits) == R.
        group (ProcessGroup): the group (None: the default group).

    Returns:
        Tensor of shape `[sum(recv_splits), ...]`, grouped by source rank. Differentiable in x.
    """
    if sum(send_splits) != x.shape[0]:
        raise ValueError(f"momoe: send_splits {send_splits} must sum to the {x.shape[0]} rows of x")
    return _AllToAllRows.apply(x, list(send_splits), list(recv_splits), group)


def all_to_all_counts(send_counts: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """send_counts: `[P, ...]` int64, slice q for rank q -> `[P, ...]`, slice q from rank q."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


def all_gather_rows(x: torch.Tensor, group: Optional[ProcessGroup] = None) -> Tuple[torch.Tensor, List[int]]:
    """Every rank's rows, concatenated in rank order; ranks may hold different numbers of rows.

    Args:
        x (Tensor): this rank's rows of shape `[R_p, K]` (R_p may be 0).
        group (ProcessGroup): the group (None: the default group).

    Returns:
        (Tensor of shape `[sum_p R_p, K]`, detached; the list of R_p in rank order).
    """
    world = dist.get_world_size(group)
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    if max(sizes) == 0:
        return x.detach().new_zeros((0,) + tuple(x.shape[1:])), sizes
    padded = x.detach().new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sizes
