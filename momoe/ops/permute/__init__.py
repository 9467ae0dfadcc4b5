"""Permutation ops: the token dispatch / combine path of every MoE layer and modality split.

Top-k MoE dispatch and combine (T tokens, E experts, k experts per token)::

    order, sizes = sort_by_group(expert_ids, E)     # expert_ids: [T, k]; order: [T*k], sizes: [E]
    xs = gather_rows(x, order // k)                 # [T*k, D], rows grouped by expert
    ys = experts(xs, sizes)                         # e.g. momoe grouped_gemm(xs, w, sizes)
    y = scatter_rows(ys, order // k, T, weight=gates.flatten()[order])   # [T, D]
"""
from typing import Optional, Tuple

import torch

from momoe.ops.backend import extension_available, require_extension, use_reference
from momoe.ops.permute import naive
from momoe.ops.permute import permute as _registrations  # noqa: F401  (fake + autograd registrations)

__all__ = ["sort_by_group", "gather_rows", "scatter_rows"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_index(index: torch.Tensor, name: str) -> None:
    if index.dtype not in _INT_DTYPES:
        raise ValueError(f"momoe: {name} must be an integer tensor (int8/uint8/int16/int32/int64), got {index.dtype}")


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"momoe: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"momoe: {name} must have 2 dimensions, got shape {tuple(t.shape)}")


def _check_same_device(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"momoe: {name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def _kernel() -> None:
    if not extension_available():
        require_extension()


def sort_by_group(group_ids: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Stable counting sort of (token, slot) positions by group.

    Args:
        group_ids (Tensor): group (expert / modality) of each token, of shape `[T]`, or `[T, k]` for top-k
            routing (flattened: position `t * k + j` is slot `j` of token `t`); any integer dtype, values in
            `[0, num_groups)`.
        num_groups (int): number of groups `G` (>= 0); groups may be empty.

    Returns:
        order (Tensor): int64 of shape `[T * k]`, the flattened positions sorted by group; positions of one
            group keep their original (ascending) order. `order // k` are the token rows to gather.
        group_sizes (Tensor): int64 of shape `[G]`, the number of positions in each group.

    Example::

        >>> expert_ids = torch.tensor([[1, 0], [1, 2], [0, 1]])
        >>> order, sizes = sort_by_group(expert_ids, 4)
        >>> order, sizes
        (tensor([1, 4, 0, 2, 5, 3]), tensor([2, 3, 1, 0]))
    """
    _check_index(group_ids, "group_ids")
    if group_ids.dim() not in (1, 2):
        raise ValueError(f"momoe: group_ids must have shape (T,) or (T, k), got shape {tuple(group_ids.shape)}")
    if num_groups < 0:
        raise ValueError(f"momoe: num_groups must be >= 0, got {num_groups}")
    if use_reference():
        return naive.sort_by_group(group_ids, num_groups)
    _kernel()
    return torch.ops.momoe.sort_by_group(group_ids, num_groups)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    r"""Gather rows: `out[r] = x[index[r]]` (dispatch of tokens to their groups).

    Args:
        x (Tensor): rows of shape `[T, D]`, float32 / bfloat16 / float16 (may be non-contiguous).
        index (Tensor): rows to take, of shape `[R]`, any integer dtype, values in `[0, T)`; repeats allowed.

    Returns:
        Tensor of shape `[R, D]` in x's dtype. Differentiable in x (the gradient sums the rows back with
        `scatter_rows`).

    Example::

        >>> x = torch.randn(3, 4)
        >>> order, sizes = sort_by_group(torch.tensor([[1, 0], [1, 2], [0, 1]]), 4)
        >>> xs = gather_rows(x, order // 2)   # [6, 4]: rows of expert 0, then 1, then 2
    """
    _check_rows(x, "x")
    _check_index(index, "index")
    if index.dim() != 1:
        raise ValueError(f"momoe: index must have 1 dimensions, got shape {tuple(index.shape)}")
    _check_same_device(x, "x", index, "index")
    if use_reference():
        return naive.gather_rows(x, index)
    _kernel()
    return torch.ops.momoe.gather_rows(x, index)


def scatter_rows(
    y: torch.Tensor, index: torch.Tensor, num_rows: int, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""Scatter-add rows: `out[i] = sum over r with index[r] == i of weight[r] * y[r]` (combine of the
    expert outputs into their tokens). Accumulates in fp32 in a fixed order (deterministic).

    Args:
        y (Tensor): rows of shape `[R, D]`, float32 / bfloat16 / float16 (may be non-contiguous).
        index (Tensor): destination row of each row of y, shape `[R]`, any integer dtype, in `[0, num_rows)`.
        num_rows (int): number of output rows `T`; rows that receive nothing are zero.
        weight (Optional[Tensor]): per-row weights (e.g. router gates) of shape `[R]`, in y's dtype or
            float32. Default: `None` (all ones).

    Returns:
        Tensor of shape `[T, D]` in y's dtype. Differentiable in y and weight.

    Example::

        >>> T, E, k, D = 5, 4, 2, 8
        >>> x, logits = torch.randn(T, D), torch.randn(T, E)
        >>> gates, expert_ids = logits.softmax(-1).topk(k, dim=-1)
        >>> order, sizes = sort_by_group(expert_ids, E)
        >>> xs = gather_rows(x, order // k)
        >>> ys = torch.tanh(xs)   # the experts
        >>> y = scatter_rows(ys, order // k, T, weight=gates.flatten()[order])   # [T, D]
    """
    _check_rows(y, "y")
    _check_index(index, "index")
    if index.dim() != 1:
        raise ValueError(f"momoe: index must have 1 dimensions, got shape {tuple(index.shape)}")
    if index.shape[0] != y.shape[0]:
        raise ValueError(f"momoe: index must have one entry per row of y ({y.shape[0]}), got shape {tuple(index.shape)}")
    if num_rows < 0:
        raise ValueError(f"momoe: num_rows must be >= 0, got {num_rows}")
    _check_same_device(y, "y", index, "index")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != y.shape[0]:
            raise ValueError(
                f"momoe: weight must have shape ({y.shape[0]},) (one per row of y), got {tuple(weight.shape)}"
            )
        if weight.dtype not in (y.dtype, torch.float32):
            raise ValueError(f"momoe: weight must be {y.dtype} (like y) or float32, got {weight.dtype}")
        _check_same_device(y, "y", weight, "weight")
    if use_reference():
        return naive.scatter_rows(y, index, num_rows, weight)
    _kernel()
    return torch.ops.momoe.scatter_rows(y, index, num_rows, weight)
