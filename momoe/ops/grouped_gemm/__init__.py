"""Grouped GEMM: one matrix product per group of consecutive rows (the expert FFNs of a MoE)."""
import torch

from momoe.ops.backend import require_extension, use_reference
from momoe.ops.grouped_gemm import naive
from momoe.ops.grouped_gemm.grouped_gemm import check_grouped_gemm_inputs

__all__ = ["grouped_gemm"]


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, trans_w: bool = False
) -> torch.Tensor:
    r"""Multiply each group of consecutive rows of `x` by its own weight matrix.

    ``y[rows of g] = x[rows of g] @ w[g]`` (``w[g]^T`` with `trans_w`), accumulated in fp32.
    Differentiable in `x` and `w`.

    Args:
        x (Tensor): tokens of shape `[T, K]`, rows already sorted by group
            (float32, bfloat16 or float16).
        w (Tensor): weights of shape `[G, K, N]`, or `[G, N, K]` when `trans_w` is True
            (the `nn.Linear` layout); same dtype as `x`.
        group_sizes (Tensor): rows per group of shape `[G]`, any integer dtype, each >= 0,
            summing to `T`. Zero-size groups are allowed.
        trans_w (bool): use ``w[g]^T``. Default: False.

    Returns:
        y (Tensor): output of shape `[T, N]` in the dtype of `x`.

    Example::

        >>> x = torch.randn(5, 8)
        >>> w = torch.randn(3, 8, 4)
        >>> y = grouped_gemm(x, w, torch.tensor([2, 0, 3]))
        >>> torch.allclose(y[:2], x[:2] @ w[0], atol=1e-5)
        True
    """
    check_grouped_gemm_inputs(x, w, group_sizes, trans_w)
    if use_reference():
        return naive.grouped_gemm(x, w, group_sizes, trans_w)
    require_extension()
    return torch.ops.momoe.grouped_gemm(x, w, group_sizes, trans_w)
