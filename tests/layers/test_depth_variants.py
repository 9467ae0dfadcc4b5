"""The depth-routing variants of the MoD family: top-k over the batch (MoMa) or per span (VideoLLM-MoD),
p-MoD's TanhNorm gate, STRing ("symmetric") and γ-MoD's FFN-only weighting, a router shared by layers,
per-layer capacities and p-MoD's progressive ratio decay."""
import math

import pytest
import torch

import momoe
from momoe.layers.depth import DepthRouter, MixtureOfDepths, progressive_ratio_decay
from momoe.layers.routers import RoutingContext
from momoe.models import TransformerConfig, TransformerLM
from momoe.models.transformer.modeling_transformer import TransformerBlock
from tests.layers.test_depth import D, M, inputs, make_block, routing_of
from tests.models.helpers import batch, randomize
from tests.utils import TOLERANCES, assert_close

FP32 = TOLERANCES[torch.float32]


def test_batch_selection_takes_the_top_k_of_the_whole_batch():
    torch.manual_seed(0)
    router = DepthRouter(D, 0.25, selection="batch")
    x = torch.randn(3, 10, D)
    decision = router(x, None, RoutingContext())
    assert int(decision.selected.sum()) == math.ceil(0.25 * 30)
    threshold = decision.logits[decision.selected].min()
    assert bool((decision.logits[~decision.selected] <= threshold).all())


def test_span_selection_takes_the_top_k_of_every_span():
    torch.manual_seed(0)
    router = DepthRouter(D, 0.5, selection="span")
    x = torch.randn(2, 12, D)
    mod = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0],
                        [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    decision = router(x, mod == 1, RoutingContext())
    assert bool(decision.selected[mod == 0].all())  # text always goes through
    spans = {0: [[1, 2, 3], [6, 7, 8, 9, 10]], 1: [[0, 1], [3, 4, 5, 6, 7]]}
    for b, row_spans in spans.items():
        for span in row_spans:
            chosen = decision.selected[b, span]
            assert int(chosen.sum()) == math.ceil(0.5 * len(span)), (b, span)
            logits = decision.logits[b, span]
            assert bool((logits[~chosen] <= logits[chosen].min()).all())


def test_tanh_norm_gate_starts_at_one():
    router = DepthRouter(D, 0.5, gate="tanh_norm")
    assert torch.count_nonzero(router.weight) == 0  # zero-initialised, as p-MoD
    x = torch.randn(2, 6, D)
    decision = router(x, None, RoutingContext())
    assert torch.equal(decision.gate, torch.ones(2, 6))
    with torch.no_grad():
        router.weight.normal_()
    decision = router(x, None, RoutingContext())
    assert_close("gate", 0.2 * torch.tanh(decision.logits) + 1, decision.gate, **FP32)


def loop_reference(block: TransformerBlock, x, mod, positions, decision, split: bool, weighting: str):
    """Row by row: processed tokens through block.process with the FFN output scaled by their weight;
    with "symmetric", skipped routable tokens are scaled by their gate."""
    y = x.clone()
    for b in range(x.shape[0]):
        sel = decision.selected[b].nonzero()[:, 0]
        xs, mods = x[b, sel][None], mod[b, sel][None]
        y[b, sel] = block.process(xs, mods, routing_of(mods, split), positions[sel],
                                  ffn_scale=decision.weights[b, sel][None])[0]
        if weighting == "symmetric":
            skipped = (decision.routable[b] & ~decision.selected[b]).nonzero()[:, 0]
            y[b, skipped] = x[b, skipped] * decision.gate[b, skipped, None]
    return y


@pytest.mark.parametrize("weighting", ["ffn", "symmetric"])
@pytest.mark.parametrize("split", [False, True], ids=["dense", "mot"])
def test_ffn_and_symmetric_weighting_paths_agree(weighting, split):
    block = make_block(split, capacity=0.4, routable_modalities=[1], gate="tanh_norm")
    block.depth.weighting = weighting
    with torch.no_grad():
        block.depth.router.weight.normal_()
    x, mod = inputs(3, 15)
    positions = torch.arange(15)
    ctx = RoutingContext()
    decision = block.depth.router(x, block.depth.routable(mod), ctx)
    reference = loop_reference(block, x, mod, positions, decision, split, weighting)
    gathered = block(x, mod, routing_of(mod, split), positions)  # training: the gathered path
    assert_close("gathered", reference, gathered, **FP32)
    direct = block.depth.forward_masked(block.process, x, mod, routing_of(mod, split), positions, decision, None, ctx)
    if weighting == "symmetric":
        skipped = (decision.routable & ~decision.selected)[..., None]
        direct = torch.where(skipped, x * decision.gate[..., None], direct)
    assert_close("masked", reference, direct, **FP32)


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(vocab_size=64, d_model=32, n_layer=4, n_heads=4, modalities=["text", "image"], **kw)


def test_shared_router_is_one_module_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny(mod_layers=[1, 2, 3], mod_capacity=[0.5, 0.25, 0.25], mod_shared_router=True,
                                         mod_weighting="ffn", mod_modalities=["image"])))
    routers = {id(layer.depth.router) for layer in model.layers if layer.depth is not None}
    assert len(routers) == 1
    assert [layer.depth.capacity for layer in model.layers[1:]] == [0.5, 0.25, 0.25]
    ids, mod = batch(model.config)
    model.save_pretrained(str(tmp_path))
    loaded = momoe.from_pretrained(str(tmp_path))
    assert loaded.layers[1].depth.router is loaded.layers[3].depth.router
    assert torch.equal(model(ids, mod).logits, loaded(ids, mod).logits)


def test_per_layer_capacities():
    torch.manual_seed(0)
    model = TransformerLM(tiny(mod_layers=[0, 2], mod_capacity=[0.5, 0.125]))
    ids, mod = batch(model.config, B=2, L=16)
    stats = model(ids, mod).router_stats
    assert int(stats["layers.0.depth"].tokens_per_expert) == 2 * 8
    assert int(stats["layers.2.depth"].tokens_per_expert) == 2 * 2


def test_progressive_ratio_decay_matches_p_mod():
    layers, capacities = progressive_ratio_decay(32)
    assert layers == list(range(8, 32))  # layers 0-7 keep more than 85%: dense
    assert capacities[0] == pytest.approx(math.cos(8 * math.pi / 31) / 2 + 0.5, abs=1e-6)  # 0.844
    assert capacities[-8:] == [0.15] * 8  # floored from layer 24 on
    mean_keep = (8 + sum(capacities)) / 32
    assert mean_keep == pytest.approx(0.5375, abs=2e-3)


@pytest.mark.parametrize("changes, match", [
    (dict(mod_layers=[2, 1]), "increasing"),
    (dict(mod_layers=[1, 2], mod_capacity=[0.5]), "one per MoD layer"),
    (dict(mod_layers=[1], mod_capacity=[1.5]), "mod_capacity"),
    (dict(mod_layers=[1], mod_selection="frame"), "mod_selection"),
    (dict(mod_layers=[1], mod_weighting="mlp"), "mod_weighting"),
    (dict(mod_layers=[1], mod_gate="relu"), "mod_gate"),
], ids=["unsorted", "capacity-list", "capacity-range", "selection", "weighting", "gate"])
def test_bad_depth_config(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_layer_bad_weighting():
    with pytest.raises(ValueError, match="weighting"):
        MixtureOfDepths(DepthRouter(D, 0.5), M, False, weighting="mlp")
    with pytest.raises(ValueError, match="selection"):
        DepthRouter(D, 0.5, selection="frame")
