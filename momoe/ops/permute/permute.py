"""Fake (meta) and autograd registrations of torch.ops.momoe's permutation ops.

gather_rows' backward is scatter_rows (summing into the gathered rows); scatter_rows' backward is
scatter_rows_backward (the weighted gather of the cotangent and the per-row dot products for the
weights). sort_by_group and scatter_rows_backward are not differentiable.
"""
from typing import Optional

import torch

from momoe.ops.backend import extension_available


def _same_device(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    torch._check(
        a.device == b.device,
        lambda: f"momoe: {name_a} and {name_b} must be on the same device, got {a.device} and {b.device}",
    )


if extension_available():

    @torch.library.register_fake("momoe::sort_by_group")
    def _sort_by_group_fake(group_ids: torch.Tensor, num_groups: int):
        torch._check(group_ids.dim() in (1, 2), lambda: "momoe: group_ids must have shape (T,) or (T, k)")
        torch._check(num_groups >= 0, lambda: f"momoe: num_groups must be >= 0, got {num_groups}")
        order = group_ids.new_empty((group_ids.numel(),), dtype=torch.int64)
        sizes = group_ids.new_empty((num_groups,), dtype=torch.int64)
        return order, sizes

    @torch.library.register_fake("momoe::gather_rows")
    def _gather_rows_fake(x: torch.Tensor, index: torch.Tensor):
        torch._check(x.dim() == 2, lambda: "momoe: x must have 2 dimensions")
        torch._check(index.dim() == 1, lambda: "momoe: index must have 1 dimensions")
        _same_device(x, "x", index, "index")
        return x.new_empty((index.shape[0], x.shape[1]))

    @torch.library.register_fake("momoe::scatter_rows")
    def _scatter_rows_fake(y: torch.Tensor, index: torch.Tensor, num_rows: int, weight: Optional[torch.Tensor] = None):
        torch._check(y.dim() == 2, lambda: "momoe: y must have 2 dimensions")
        torch._check(index.dim() == 1, lambda: "momoe: index must have 1 dimensions")
        torch._check(index.shape[0] == y.shape[0], lambda: "momoe: index must have one entry per row of y")
        torch._check(num_rows >= 0, lambda: f"momoe: num_rows must be >= 0, got {num_rows}")
        _same_device(y, "y", index, "index")
        return y.new_empty((num_rows, y.shape[1]))

    @torch.library.register_fake("momoe::scatter_rows_backward")
    def _scatter_rows_backward_fake(
        grad_out: torch.Tensor, y: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor]
    ):
        torch._check(y.dim() == 2 and grad_out.dim() == 2, lambda: "momoe: y and grad_out must have 2 dimensions")
        _same_device(y, "y", index, "index")
        grad_y = y.new_empty(y.shape)
        if weight is None:
            grad_weight = y.new_empty((0,), dtype=torch.float32)
        else:
            grad_weight = weight.new_empty((y.shape[0],))
        return grad_y, grad_weight

    def _gather_rows_setup(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]

    def _gather_rows_backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        grad_x = torch.ops.momoe.scatter_rows(grad_out, index, ctx.num_rows, None)
        return grad_x, None

    torch.library.register_autograd("momoe::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup)

    def _scatter_rows_setup(ctx, inputs, output):
        y, index, num_rows, weight = inputs
        ctx.save_for_backward(y, index, weight)

    def _scatter_rows_backward(ctx, grad_out):
        y, index, weight = ctx.saved_tensors
        grad_y, grad_weight = torch.ops.momoe.scatter_rows_backward(grad_out, y, index, weight)
        return grad_y, None, None, (grad_weight if weight is not None else None)

    torch.library.register_autograd(
        "momoe::scatter_rows", _scatter_rows_backward, setup_context=_scatter_rows_setup
    )
