"""Rotary position embeddings (RoPE, Su et al. 2021) in the Llama convention: the head dimension is
split in two halves that are rotated together ("rotate half"), frequency i of the head_dim / 2 is
theta ** (-2i / head_dim), angles and their cos/sin are computed in fp32.

Positions are absolute token positions, so a decoding step with a KV cache passes the positions of
its new tokens (cache length onwards) and gets the same angles as a full forward.

Shape legend: B batch, H heads, L time, E head_dim.
"""
from typing import Tuple

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, in fp32.

    positions: (L,) or (B, L) integer positions. Returns cos, sin of shape (L, E) or (B, L, E), the
    head_dim / 2 frequencies repeated for the two halves.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"momoe: rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., L, E/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., L, E)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x: (..., E) -> (-x2, x1) where x1, x2 are x's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their tokens' positions.

    q: (B, H, L, E); k: (B, H_kv, L, E); positions: (L,) or (B, L) absolute positions. Returns the
    rotated q and k in their own dtypes (the rotation itself runs in fp32).

    Example:
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
        >>> q, k = apply_rotary(q, k, torch.arange(5))
    """
    cos, sin = rotary_cos_sin(positions, q.shape[-1], theta)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads: (1, L, E) or (B, 1, L, E)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)

    return rotate(q), rotate(k)
