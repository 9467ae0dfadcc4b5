"""Attention against an explicit softmax reference, and the invariants decoding and Mixture-of-
Transformers rely on: causality, KV-cache decoding, per-modality weights, packed documents."""
import math
from typing import Optional

import pytest
import torch

from momoe.layers.attention import Attention, KVCache
from momoe.layers.modality_linear import ModalityLinear, ModalityRouting
from tests.utils import assert_close, case_id


# ----------------------------------------------------------------------------- reference
def per_token_linear(linear: ModalityLinear, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """x: (B, L, K), modality: (B, L) -> (B, L, N), each token through its modality's weight, in fp64."""
    y = torch.einsum("blk,blnk->bln", x, linear.weight.double()[modality])
    return y if linear.bias is None else y + linear.bias.double()[modality]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, L, H, E); positions: (L,): the pair (x[i], x[i + E/2]) turns by position * theta^(-2i/E)."""
    half = x.shape[-1] // 2
    angle = positions.double()[:, None] * theta ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (L, 1, E/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def reference_attention(layer: Attention, x: torch.Tensor, modality: torch.Tensor, positions: torch.Tensor,
                        allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(E) + causal mask) v written out in fp64, GQA by repeat_interleave.
    x: (B, L, D); modality: (B, L); allowed: (B, L, L) extra boolean mask."""
    B, L, D = x.shape
    H, K, E = layer.n_heads, layer.n_kv_heads, layer.head_dim
    x = x.double()
    q = per_token_linear(layer.wq, x, modality).view(B, L, H, E)
    k = per_token_linear(layer.wk, x, modality).view(B, L, K, E)
    v = per_token_linear(layer.wv, x, modality).view(B, L, K, E)
    if layer.q_norm is not None:
        q = rms_norm(q, layer.q_norm.weight.double()[modality][:, :, None], layer.q_norm.eps)
        k = rms_norm(k, layer.k_norm.weight.double()[modality][:, :, None], layer.k_norm.eps)
    q, k = rope(q, positions, layer.rope_theta), rope(k, positions, layer.rope_theta)
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(E)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    if allowed is not None:
        mask = mask & allowed[:, None]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = torch.einsum("bhqk,bkhe->bqhe", probs, v).reshape(B, L, D)
    return per_token_linear(layer.wo, y, modality)


# ----------------------------------------------------------------------------- helpers
def make_layer(M: int = 1, H: int = 4, K: Optional[int] = None, qk_norm: bool = False, bias: bool = False,
               D: int = 32, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(D, H, K, num_modalities=M, qk_norm=qk_norm, bias=bias)
    if qk_norm:  # away from the all-ones initialisation so the norm weights are tested
        with torch.no_grad():
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    return layer


def routing_for(modality: torch.Tensor, M: int) -> Optional[ModalityRouting]:
    return ModalityRouting.from_ids(modality, M) if M > 1 else None


def run(layer: Attention, x: torch.Tensor, modality: torch.Tensor, positions: Optional[torch.Tensor] = None,
        **kwargs) -> torch.Tensor:
    positions = torch.arange(x.shape[1]) if positions is None else positions
    return layer(x, routing_for(modality, layer.num_modalities), positions, **kwargs)


TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- tests
CASES = [
    dict(M=1, H=4, K=4, qk_norm=False, bias=False),
    dict(M=1, H=4, K=2, qk_norm=False, bias=False),
    dict(M=1, H=4, K=1, qk_norm=True, bias=False),
    dict(M=1, H=4, K=4, qk_norm=True, bias=True),
    dict(M=3, H=4, K=4, qk_norm=False, bias=False),
    dict(M=3, H=4, K=2, qk_norm=True, bias=False),
    dict(M=2, H=8, K=2, qk_norm=True, bias=True),
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(**c) for c in CASES])
def test_matches_reference(case):
    layer = make_layer(**case)
    x = torch.randn(2, 11, 32, requires_grad=True)
    modality = torch.randint(0, case["M"], (2, 11))
    y = run(layer, x, modality)
    y_ref = reference_attention(layer, x, modality, torch.arange(11))
    assert_close("y", y_ref, y, **TOL)
    g = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, g)
    dx_ref, = torch.autograd.grad(y_ref, x, g.double())
    assert_close("dx", dx_ref, dx, **TOL)


def test_per_row_positions_match_shared_positions():
    layer = make_layer(M=2, K=2, qk_norm=True)
    x, modality = torch.randn(2, 6, 32), torch.randint(0, 2, (2, 6))
    shared = run(layer, x, modality, torch.arange(6) + 3)
    per_row = run(layer, x, modality, (torch.arange(6) + 3).expand(2, 6))
    assert_close("y", shared, per_row, atol=0, rtol=0)


@pytest.mark.parametrize("M", [1, 3])
def test_causal(M):
    layer = make_layer(M=M, K=2)
    x, modality = torch.randn(2, 12, 32), torch.randint(0, M, (2, 12))
    y = run(layer, x, modality)
    for t in (0, 5, 10):
        x2, modality2 = x.clone(), modality.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        modality2[:, t + 1 :] = torch.randint(0, M, modality2[:, t + 1 :].shape)
        y2 = run(layer, x2, modality2)
        assert_close(f"outputs up to {t}", y[:, : t + 1], y2[:, : t + 1], **TOL)
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("chunk", [1, 3, 5])
@pytest.mark.parametrize("M", [1, 3])
def test_kv_cache_decoding_matches_full_forward(M, chunk):
    layer = make_layer(M=M, H=4, K=2, qk_norm=True)
    L = 13
    x, modality = torch.randn(2, L, 32), torch.randint(0, M, (2, L))
    full = run(layer, x, modality)
    cache, outs = KVCache(), []
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        outs.append(run(layer, x[:, start:stop], modality[:, start:stop], torch.arange(start, stop), cache=cache))
        assert cache.length == stop
    assert cache.k.shape == cache.v.shape == (2, 2, L, 8)
    assert_close(f"chunks of {chunk}", full, torch.cat(outs, dim=1), **TOL)


def test_kv_cache_update():
    cache = KVCache()
    assert cache.length == 0
    k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    assert cache.update(k, v) == (k, v)
    k2, v2 = cache.update(k[:, :, :1], v[:, :, :1])
    assert cache.length == 5 and torch.equal(k2[:, :, 4], k[:, :, 0]) and torch.equal(v2[:, :, :4], v)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_identical_modality_weights_equal_dense(qk_norm):
    mot = make_layer(M=3, K=2, qk_norm=qk_norm, bias=True)
    dense = make_layer(M=1, K=2, qk_norm=qk_norm, bias=True)
    with torch.no_grad():
        for name, p in mot.named_parameters():
            p.copy_(p[0].expand_as(p))
            dense.get_parameter(name).copy_(p[:1])
    x, modality = torch.randn(2, 9, 32), torch.randint(0, 3, (2, 9))
    assert_close("y", run(dense, x, modality), run(mot, x, modality), **TOL)


def test_tokens_use_only_their_modality_weights():
    layer = make_layer(M=3, K=2, qk_norm=True)
    x = torch.randn(2, 10, 32)
    text_only = torch.zeros(2, 10, dtype=torch.long)
    mixed = torch.zeros(2, 10, dtype=torch.long)
    mixed[:, 6:8] = 1  # image tokens in the middle of text
    before_text, before_mixed = run(layer, x, text_only), run(layer, x, mixed)
    with torch.no_grad():
        layer.wq.weight[1].add_(0.5)
        layer.wk.weight[1].add_(0.5)
        layer.wv.weight[1].add_(0.5)
    after_text, after_mixed = run(layer, x, text_only), run(layer, x, mixed)
    assert_close("text-only sequences", before_text, after_text, atol=0, rtol=0)
    assert_close("text before the image", before_mixed[:, :6], after_mixed[:, :6], atol=0, rtol=0)
    assert not torch.allclose(before_mixed[:, 6:8], after_mixed[:, 6:8])  # the image tokens' own projections
    assert not torch.allclose(before_mixed[:, 8:], after_mixed[:, 8:])  # text after them attends to them (global)


@pytest.mark.parametrize("M,K", [(1, 4), (3, 2)], ids=["dense-MHA", "M3-GQA"])
def test_packed_documents_equal_separate_runs(M, K):
    """Two documents in one row, block-diagonal attn_mask and positions restarting: same as each alone."""
    layer = make_layer(M=M, K=K, qk_norm=True)
    lengths = (5, 7)
    L = sum(lengths)
    x, modality = torch.randn(2, L, 32), torch.randint(0, M, (2, L))
    doc = torch.repeat_interleave(torch.arange(2), torch.tensor(lengths))  # (L,)
    same_doc = (doc[:, None] == doc[None, :]).expand(2, L, L)
    positions = torch.cat([torch.arange(n) for n in lengths])
    packed = run(layer, x, modality, positions, attn_mask=same_doc)
    alone = [run(layer, x[:, doc == d], modality[:, doc == d]) for d in range(2)]
    assert_close("packed", torch.cat(alone, dim=1), packed, **TOL)
    assert_close("packed vs reference", reference_attention(layer, x, modality, positions, same_doc), packed, **TOL)


def test_attn_mask_with_cache():
    """A chunk after a cached prefix, with attn_mask (B, L, T) covering cached + new tokens."""
    layer = make_layer(M=2, K=2)
    x, modality = torch.randn(1, 8, 32), torch.randint(0, 2, (1, 8))
    allowed = torch.ones(1, 8, 8, dtype=torch.bool)
    allowed[:, 5:, :2] = False  # the last tokens may not see the first two
    full = run(layer, x, modality, attn_mask=allowed)
    cache = KVCache()
    first = run(layer, x[:, :4], modality[:, :4], torch.arange(4), cache=cache, attn_mask=allowed[:, :4, :4])
    second = run(layer, x[:, 4:], modality[:, 4:], torch.arange(4, 8), cache=cache, attn_mask=allowed[:, 4:])
    assert_close("y", full, torch.cat([first, second], dim=1), **TOL)
    with pytest.raises(ValueError, match="attn_mask"):
        run(layer, x, modality, attn_mask=allowed[:, :, :7])


def test_autocast_bf16():
    layer = make_layer(M=2, K=2, qk_norm=True)
    x, modality = torch.randn(2, 7, 32), torch.randint(0, 2, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(layer, x, modality)
    assert y.dtype == torch.bfloat16
    assert_close("y", reference_attention(layer, x, modality, torch.arange(7)), y, atol=5e-2, rtol=5e-2)


def test_bad_configs():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be divisible by n_kv_heads \(4\)"):
        Attention(48, 6, 4)
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="even head_dim"):
        Attention(12, 4)
    with pytest.raises(ValueError, match="ModalityRouting"):
        Attention(32, 4, num_modalities=2)(torch.randn(1, 3, 32), None, torch.arange(3))
