"""Pure-PyTorch reference of the grouped GEMM: a plain loop over groups in fp32.

Shape legend: T tokens (rows of x), K input features, N output features, G groups.
"""
import torch


def _group_sizes_list(group_sizes: torch.Tensor, num_groups: int, total: int) -> list:
    """Validate group_sizes like the kernel does and return them as Python ints."""
    if group_sizes.dim() != 1:
        raise ValueError(f"momoe: group_sizes must have 1 dimension, got shape {tuple(group_sizes.shape)}")
    if group_sizes.dtype.is_floating_point or group_sizes.dtype.is_complex or group_sizes.dtype == torch.bool:
        raise ValueError(f"momoe: group_sizes must be an integer tensor, got {group_sizes.dtype}")
    if group_sizes.shape[0] != num_groups:
        raise ValueError(
            f"momoe: group_sizes must have one entry per group of w (G = {num_groups}), got {group_sizes.shape[0]}"
        )
    sizes = [int(s) for s in group_sizes.tolist()]
    for g, s in enumerate(sizes):
        if s < 0:
            raise ValueError(f"momoe: group_sizes must be >= 0, got group_sizes[{g}] = {s}")
    if sum(sizes) != total:
        raise ValueError(
            f"momoe: group_sizes must sum to the number of rows of x (T) = {total}, got sum {sum(sizes)}"
        )
    return sizes


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, trans_w: bool = False
) -> torch.Tensor:
    """Reference of `momoe.ops.grouped_gemm.grouped_gemm`: y[rows of g] = x[rows of g] @ w[g] in fp32."""
    x_TK, w_GKN = x.float(), w.float()
    if trans_w:
        w_GKN = w_GKN.transpose(1, 2)
    if x_TK.shape[1] != w_GKN.shape[1]:
        raise ValueError(f"momoe: x has K = {x_TK.shape[1]} features but w has K = {w_GKN.shape[1]}")
    sizes = _group_sizes_list(group_sizes, w.shape[0], x.shape[0])
    y_TN = x_TK.new_zeros(x.shape[0], w_GKN.shape[2])
    row = 0
    for g, m in enumerate(sizes):
        y_TN[row : row + m] = x_TK[row : row + m] @ w_GKN[g]
        row += m
    return y_TN.to(x.dtype)


def grouped_gemm_dw(
    x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor, trans_w: bool = False
) -> torch.Tensor:
    """Reference of the weight gradient: dw[g] = x[rows of g]^T @ dy[rows of g] in fp32, (G, K, N)
    or (G, N, K) with trans_w; zero for empty groups."""
    x_TK, dy_TN = x.float(), dy.float()
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"momoe: x and dy must have the same number of rows, got {x.shape[0]} and {dy.shape[0]}")
    sizes = _group_sizes_list(group_sizes, group_sizes.shape[0] if group_sizes.dim() == 1 else -1, x.shape[0])
    dw_GKN = x_TK.new_zeros(len(sizes), x.shape[1], dy.shape[1])
    row = 0
    for g, m in enumerate(sizes):
        dw_GKN[g] = x_TK[row : row + m].T @ dy_TN[row : row + m]
        row += m
    if trans_w:
        dw_GKN = dw_GKN.transpose(1, 2).contiguous()
    return dw_GKN.to(x.dtype)
