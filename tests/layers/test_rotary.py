"""Rotary embeddings against the pairwise-rotation formula, and the properties attention relies on."""
import pytest
import torch

from momoe.layers.rotary import apply_rotary
from tests.utils import assert_close


def rotate_pairs_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's RoPE written out: the pair (x[i], x[i + E/2]) turns by position * theta^(-2i/E), in fp64.

    x: (B, H, L, E); positions: (L,)."""
    E = x.shape[-1]
    half = E // 2
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / E)
    angle = positions.double()[:, None] * freq  # (L, E/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_matches_pairwise_rotation(theta):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    positions = torch.arange(3, 12)
    rq, rk = apply_rotary(q, k, positions, theta)
    assert_close("q", rotate_pairs_reference(q, positions, theta), rq, atol=1e-5, rtol=1e-5)
    assert_close("k", rotate_pairs_reference(k, positions, theta), rk, atol=1e-5, rtol=1e-5)


def test_position_zero_is_identity_and_norms_are_kept():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 8)
    rq, _ = apply_rotary(q, q, torch.zeros(6, dtype=torch.long))
    assert_close("position 0", q, rq, atol=1e-6, rtol=0)
    rq, _ = apply_rotary(q, q, torch.arange(100, 106))
    assert_close("norm", q.norm(dim=-1), rq.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_dot_product_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32).double(), torch.randn(1, 1, 1, 32).double()

    def score(m: int, n: int) -> torch.Tensor:
        rq, _ = apply_rotary(q, q, torch.tensor([m]))
        _, rk = apply_rotary(k, k, torch.tensor([n]))
        return (rq * rk).sum()

    for m, n in [(5, 2), (2, 5), (7, 7), (40, 3)]:
        for shift in (1, 17, 1000):
            assert_close(f"score({m}+{shift}, {n}+{shift})", score(m, n), score(m + shift, n + shift), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(6, 2))  # and it does depend on the distance


def test_offset_positions_match_the_full_sequence():
    """A cached decode step passes the absolute positions of its tokens: same angles as the full run."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8)
    full_q, full_k = apply_rotary(q, k, torch.arange(10))
    for start, stop in [(0, 4), (4, 5), (5, 10)]:
        part_q, part_k = apply_rotary(q[:, :, start:stop], k[:, :, start:stop], torch.arange(start, stop))
        assert_close(f"q[{start}:{stop}]", full_q[:, :, start:stop], part_q, atol=1e-6, rtol=1e-6)
        assert_close(f"k[{start}:{stop}]", full_k[:, :, start:stop], part_k, atol=1e-6, rtol=1e-6)


def test_per_row_positions():
    """positions (B, L): each row rotated by its own positions."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    positions = torch.stack([torch.arange(5), torch.arange(7, 12)])
    rq, rk = apply_rotary(q, k, positions)
    for b in range(2):
        eq, ek = apply_rotary(q[b : b + 1], k[b : b + 1], positions[b])
        assert_close(f"q row {b}", eq, rq[b : b + 1], atol=0, rtol=0)
        assert_close(f"k row {b}", ek, rk[b : b + 1], atol=0, rtol=0)


def test_keeps_dtype_and_rejects_odd_head_dim():
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    rq, rk = apply_rotary(q, q, torch.arange(3))
    assert rq.dtype == rk.dtype == torch.bfloat16
    assert_close("bf16", rotate_pairs_reference(q, torch.arange(3), 10000.0), rq, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7), torch.arange(2))
