"""Pure-PyTorch references of the permutation ops (same signatures as momoe.ops.permute).

They upcast to fp32, loop plainly, validate ids with clear errors and return the dtypes of the
public functions. Legend: T tokens, k routing slots per token, R rows, D features, G groups.
"""
from typing import Optional, Tuple

import torch

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_ids(ids: torch.Tensor, name: str, limit: int, label: str, what: str = "") -> None:
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"momoe: {name} must be an integer tensor (int8/uint8/int16/int32/int64), got {ids.dtype}")
    flat = ids.reshape(-1).long()
    bad = ((flat < 0) | (flat >= limit)).nonzero()
    if bad.numel() > 0:
        pos = int(bad[0, 0])
        raise ValueError(f"momoe: {name} must be in [0, {label}{limit}){what}, got {int(flat[pos])} at position {pos}")


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"momoe: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"momoe: {name} must have 2 dimensions, got shape {tuple(t.shape)}")


def sort_by_group(group_ids: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of momoe.ops.permute.sort_by_group: one pass per group over the flattened ids."""
    if group_ids.dim() not in (1, 2):
        raise ValueError(f"momoe: group_ids must have shape (T,) or (T, k), got shape {tuple(group_ids.shape)}")
    if num_groups < 0:
        raise ValueError(f"momoe: num_groups must be >= 0, got {num_groups}")
    _check_ids(group_ids, "group_ids", num_groups, "num_groups=")
    flat_N = group_ids.reshape(-1).long()
    order, sizes = [], []
    for g in range(num_groups):
        rows = (flat_N == g).nonzero().flatten()  # ascending positions: a stable sort
        order.append(rows)
        sizes.append(rows.numel())
    order_N = torch.cat(order) if order else flat_N.new_zeros(0)
    return order_N.to(torch.int64), torch.tensor(sizes, dtype=torch.int64, device=group_ids.device)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference of momoe.ops.permute.gather_rows: out[r] = x[index[r]]."""
    _check_rows(x, "x")
    if index.dim() != 1:
        raise ValueError(f"momoe: index must have 1 dimensions, got shape {tuple(index.shape)}")
    _check_ids(index, "index", x.shape[0], "", " (the rows of x)")
    x_TD = x.float()
    rows = [x_TD[int(i)] for i in index.long()]
    out_RD = torch.stack(rows) if rows else x_TD.new_zeros(0, x.shape[1])
    return out_RD.to(x.dtype)


def scatter_rows(
    y: torch.Tensor, index: torch.Tensor, num_rows: int, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Reference of momoe.ops.permute.scatter_rows: out[i] = sum over index[r] == i of weight[r] * y[r]."""
    _check_rows(y, "y")
    if index.dim() != 1:
        raise ValueError(f"momoe: index must have 1 dimensions, got shape {tuple(index.shape)}")
    if num_rows < 0:
        raise ValueError(f"momoe: num_rows must be >= 0, got {num_rows}")
    R, D = y.shape
    if index.shape[0] != R:
        raise ValueError(f"momoe: index must have one entry per row of y ({R}), got shape {tuple(index.shape)}")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != R:
            raise ValueError(f"momoe: weight must have shape ({R},) (one per row of y), got {tuple(weight.shape)}")
        if weight.dtype not in (y.dtype, torch.float32):
            raise ValueError(f"momoe: weight must be {y.dtype} (like y) or float32, got {weight.dtype}")
    _check_ids(index, "index", num_rows, "num_rows=")
    y_RD = y.float()
    out = [y_RD.new_zeros(D) for _ in range(num_rows)]
    for r, i in enumerate(index.long().tolist()):
        contribution = y_RD[r] if weight is None else weight[r].float() * y_RD[r]
        out[i] = out[i] + contribution
    out_ND = torch.stack(out) if out else y_RD.new_zeros(0, D)
    return out_ND.to(y.dtype)
