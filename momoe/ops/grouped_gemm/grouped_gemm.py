"""Fake (meta) and autograd registrations of torch.ops.momoe.grouped_gemm / grouped_gemm_dw.

Shape legend: T tokens (rows of x), K input features, N output features, G groups.
"""
import torch

from momoe.ops.backend import extension_available

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_common(x: torch.Tensor, other: torch.Tensor, other_name: str, group_sizes: torch.Tensor) -> None:
    """Checks shared by both ops that need no look at the data (ranks, dtypes, devices)."""
    if x.dim() != 2:
        raise ValueError(f"momoe: x must have 2 dimensions, got shape {tuple(x.shape)}")
    for name, t in (("x", x), (other_name, other)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"momoe: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if other.dtype != x.dtype:
        raise ValueError(f"momoe: x and {other_name} must have the same dtype, got {x.dtype} and {other.dtype}")
    if group_sizes.dim() != 1:
        raise ValueError(f"momoe: group_sizes must have 1 dimensions, got shape {tuple(group_sizes.shape)}")
    if group_sizes.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"momoe: group_sizes must be an integer tensor (int8/uint8/int16/int32/int64), got {group_sizes.dtype}"
        )
    if other.device != x.device:
        raise ValueError(
            f"momoe: x and {other_name} must be on the same device, got {x.device} and {other.device}"
        )


def check_grouped_gemm_inputs(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, trans_w: bool) -> None:
    """Ranks, dtypes, devices and shapes of grouped_gemm's inputs (the kernel checks the sizes' values)."""
    _check_common(x, w, "w", group_sizes)
    if w.dim() != 3:
        raise ValueError(f"momoe: w must have 3 dimensions, got shape {tuple(w.shape)}")
    k_w = w.shape[2] if trans_w else w.shape[1]
    if k_w != x.shape[1]:
        layout = " (trans_w=True, shape (G, N, K))" if trans_w else " (shape (G, K, N))"
        raise ValueError(
            f"momoe: x has K = {x.shape[1]} features but w{layout} has K = {k_w}; "
            f"x: {tuple(x.shape)}, w: {tuple(w.shape)}"
        )
    if group_sizes.shape[0] != w.shape[0]:
        raise ValueError(
            f"momoe: group_sizes must have one entry per group of w (G = {w.shape[0]}), got {group_sizes.shape[0]}"
        )


def check_grouped_gemm_dw_inputs(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor) -> None:
    _check_common(x, dy, "dy", group_sizes)
    if dy.dim() != 2:
        raise ValueError(f"momoe: dy must have 2 dimensions, got shape {tuple(dy.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"momoe: x and dy must have the same number of rows (T), got x: {tuple(x.shape)}, dy: {tuple(dy.shape)}"
        )


if extension_available():

    @torch.library.register_fake("momoe::grouped_gemm")
    def _grouped_gemm_fake(x, w, group_sizes, trans_w=False):
        check_grouped_gemm_inputs(x, w, group_sizes, trans_w)
        n = w.shape[1] if trans_w else w.shape[2]
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("momoe::grouped_gemm_dw")
    def _grouped_gemm_dw_fake(x, dy, group_sizes, trans_w=False):
        check_grouped_gemm_dw_inputs(x, dy, group_sizes)
        g, k, n = group_sizes.shape[0], x.shape[1], dy.shape[1]
        return x.new_empty((g, n, k) if trans_w else (g, k, n))

    def _grouped_gemm_setup_context(ctx, inputs, output):
        x, w, group_sizes, trans_w = inputs
        ctx.save_for_backward(x, w, group_sizes)
        ctx.trans_w = trans_w

    def _grouped_gemm_backward(ctx, dy):
        x, w, group_sizes = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dx[rows of g] = dy[rows of g] @ w[g]^T: the same op with the other layout of w.
            dx = torch.ops.momoe.grouped_gemm(dy, w, group_sizes, not ctx.trans_w)
        if ctx.needs_input_grad[1]:
            dw = torch.ops.momoe.grouped_gemm_dw(x, dy, group_sizes, ctx.trans_w)
        return dx, dw, None, None

    torch.library.register_autograd(
        "momoe::grouped_gemm", _grouped_gemm_backward, setup_context=_grouped_gemm_setup_context
    )
