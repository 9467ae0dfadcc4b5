"""Mixture-of-depths in the transformer (MoD every other block): training runs and trains the routers,
the router statistics count ceil(capacity * routable tokens) per row, routing restricted to image tokens
processes every other token, KV-cache decoding equals the causal forward, packed documents."""
import math

import pytest
import torch

from momoe.layers.routers import RoutingContext
from momoe.models import TransformerLM
from tests.models.helpers import batch, decode_in_pieces, randomize
from tests.models.test_transformer import TOL, tiny
from tests.utils import assert_close

MOD_LAYERS = [1, 3]  # every other block of 4


def mod_model(capacity: float, split: bool = False, **kw) -> TransformerLM:
    torch.manual_seed(0)
    return randomize(TransformerLM(tiny(split, n_layer=4, mod_layers=MOD_LAYERS, mod_capacity=capacity, **kw)))


@pytest.mark.parametrize("capacity", [0.125, 0.5])
def test_forward_backward_and_processed_fraction(capacity):
    model = mod_model(capacity)
    ids, mod = batch(model.config, B=3, L=19)
    out = model(ids, mod, labels=ids)
    out.loss.backward()
    assert bool(torch.isfinite(out.loss)) and out.aux_loss.item() == 0.0
    processed = 3 * math.ceil(capacity * 19)  # ceil per row, 3 rows
    assert sorted(out.router_stats) == [f"layers.{i}.depth" for i in MOD_LAYERS]
    for i in MOD_LAYERS:
        stats = out.router_stats[f"layers.{i}.depth"]
        assert stats.tokens_per_expert.tolist() == [processed]
        assert_close("fractions", torch.tensor([1 - processed / 57, processed / 57]), stats.fraction_routed_to,
                     atol=1e-6, rtol=0)
        router = model.layers[i].depth.router
        assert router.weight.grad is not None and torch.count_nonzero(router.weight.grad) > 0
        assert all(p.grad is None for p in router.predictor.parameters())
    assert all(model.layers[i].depth is None for i in (0, 2))


def test_image_only_routing_processes_every_other_token():
    model = mod_model(0.25, split=True, mod_modalities=["image"])
    ids, mod = batch(model.config, B=3, L=19)
    images = (mod == 1).sum(1)
    assert len(set(images.tolist())) > 1  # uneven rows: the gathered path pads
    processed = int((mod != 1).sum()) + sum(math.ceil(0.25 * int(n)) for n in images)
    out = model(ids, mod)
    for i in MOD_LAYERS:
        assert out.router_stats[f"layers.{i}.depth"].tokens_per_expert.tolist() == [processed]
    # text and speech always go through: an all-text batch is processed exactly as without MoD
    dense = TransformerLM(tiny(True, n_layer=4))
    dense.load_state_dict(model.state_dict(), strict=False)
    text = torch.zeros_like(mod)
    assert_close("all text", dense(ids, text).logits, model(ids, text).logits, **TOL)


@pytest.mark.parametrize("capacity,split,modalities", [(0.125, False, None), (0.5, True, ["image"])],
                         ids=["cap0.125", "cap0.5-mot-image"])
def test_kv_cache_decoding_equals_causal_forward(capacity, split, modalities):
    model = mod_model(capacity, split, mod_modalities=modalities)
    ids, mod = batch(model.config, L=15)
    full = model(ids, mod, causal_routing=True).logits
    got, cache = decode_in_pieces(model, ids, mod)
    assert_close("cached", full, got, **TOL)
    assert cache.layers[1].selected.shape == (2, 15)  # the depth cache tracks every token's key


def test_packed_documents_with_causal_routing_equal_separate_documents():
    model = mod_model(0.5, split=True)
    ids, mod = batch(model.config, B=1, L=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    packed = model(ids, mod, seq_idx=seq_idx, causal_routing=True).logits
    assert_close("doc 0", model(ids[:, :5], mod[:, :5], causal_routing=True).logits, packed[:, :5], **TOL)
    assert_close("doc 1", model(ids[:, 5:], mod[:, 5:], causal_routing=True).logits, packed[:, 5:], **TOL)


def test_packed_documents_stay_apart_in_the_gathered_path():
    """Packed rows keep their documents apart with a mask and restarted positions (no padding): with every
    token processed (capacity 1), the gathered path gives each document what it gets alone."""
    model = mod_model(1.0, split=True)
    ids, mod = batch(model.config, B=1, L=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    packed = model(ids, mod, seq_idx=seq_idx).logits
    assert_close("doc 0", model(ids[:, :5], mod[:, :5]).logits, packed[:, :5], **TOL)
    assert_close("doc 1", model(ids[:, 5:], mod[:, 5:]).logits, packed[:, 5:], **TOL)


@pytest.mark.parametrize("weighting", ["block", "ffn", "symmetric"])
def test_a_mod_block_whose_function_is_zero_is_the_identity(weighting):
    """With its residual branches zeroed (attention wo, FFN w2), a MoD layer passes every token through
    unchanged, in training (gathered) and causal (masked) routing; ("symmetric" scales skipped tokens by
    their gate, which is 1 for a TanhNorm router at its zero initialisation)."""
    gate = "tanh_norm" if weighting == "symmetric" else "sigmoid"
    model = mod_model(0.5, mod_weighting=weighting, mod_gate=gate)
    block = model.layers[MOD_LAYERS[0]]
    with torch.no_grad():
        block.attn.wo.weight.zero_()
        block.ffn.w2.weight.zero_()
        if weighting == "symmetric":
            block.depth.router.weight.zero_()  # TanhNorm's gate is 1 at a zero router
    x = torch.randn(2, 11, model.config.d_model)
    mod = torch.randint(0, 3, (2, 11))
    for causal in (False, True):
        y = block(x, mod, None, torch.arange(11), ctx=RoutingContext(causal=causal))
        assert torch.equal(y, x), f"causal={causal}"
