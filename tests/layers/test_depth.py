"""Mixture-of-depths: the router's per-sequence top-k, the gathered and masked execution paths against
each other and against a per-row loop through a real transformer block, causal decisions from the
predictor, and the predictor's BCE."""
import math

import pytest
import torch
import torch.nn.functional as F

from momoe.layers.depth import DepthRouter, MixtureOfDepths, gather_selected
from momoe.layers.ffn import SwiGLU
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.routers import RoutingContext
from momoe.models.transformer import TransformerConfig
from momoe.models.transformer.modeling_transformer import TransformerBlock
from tests.models.helpers import randomize
from tests.utils import TOLERANCES, assert_close

FP32 = TOLERANCES[torch.float32]
D, M = 32, 3


def expected_k(capacity: float, n: int) -> int:
    """ceil(capacity * n), immune to 0.1 * 30 = 3.0000000000000004."""
    return math.ceil(round(capacity * n, 9))


def make_block(split: bool, capacity: float, routable_modalities=None, gate: str = "sigmoid") -> TransformerBlock:
    """A randomized transformer block (per-modality weights when `split`) wrapped in a MixtureOfDepths."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, d_model=D, n_layer=2, n_heads=4, n_kv_heads=2, d_ff=48, qk_norm=True,
                               modalities=["text", "image", "speech"], modality_split=split)
    depth = MixtureOfDepths(DepthRouter(D, capacity, gate=gate), M, sorts_by_modality=split,
                            routable_modalities=routable_modalities)
    block = TransformerBlock(config, SwiGLU(D, 48, num_modalities=M if split else 1), "layers.0", depth=depth)
    return randomize(block)


def inputs(B: int, L: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=gen), torch.randint(0, M, (B, L), generator=gen)


def routing_of(modality_ids: torch.Tensor, split: bool):
    return ModalityRouting.from_ids(modality_ids, M) if split else None


# ----------------------------------------------------------------------------- router


ROUTER_CASES = [dict(capacity=0.125, gate="sigmoid"), dict(capacity=0.5, gate="linear"),
                dict(capacity=0.3, gate="sigmoid"), dict(capacity=1.0, gate="linear")]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=[f"cap{c['capacity']}-{c['gate']}" for c in ROUTER_CASES])
def test_top_k_picks_the_highest_routable_logits(case):
    torch.manual_seed(0)
    B, L = 5, 23
    router = DepthRouter(D, case["capacity"], gate=case["gate"])
    x = torch.randn(B, L, D)
    routable = torch.rand(B, L) < 0.6
    routable[3] = True  # a row where everything is routable
    routable[4] = False  # a row where nothing is
    decision = router(x, routable, RoutingContext())
    logits = x @ router.weight[0]
    assert_close("logits", logits, decision.logits, **FP32)
    assert torch.equal(router.top_k(decision.logits, routable), decision.selected & routable)
    for b in range(B):
        chosen = decision.selected[b] & routable[b]
        n = int(routable[b].sum())
        assert int(chosen.sum()) == expected_k(case["capacity"], n), (b, n)
        left_out = routable[b] & ~chosen
        if chosen.any() and left_out.any():
            assert logits[b, chosen].min() > logits[b, left_out].max()
    gate = torch.sigmoid(logits) if case["gate"] == "sigmoid" else logits
    skipped = routable & ~decision.selected
    assert bool(decision.selected[~routable].all())  # non-routable tokens always go through ...
    assert torch.equal(decision.weights[~routable], torch.ones(int((~routable).sum())))  # ... with weight 1
    assert bool((decision.weights[skipped] == 0).all())
    chosen = routable & decision.selected
    assert_close("gates", gate[chosen], decision.weights[chosen], **FP32)
    assert torch.equal(decision.routable, routable)


def test_router_without_routable_mask_routes_every_token():
    torch.manual_seed(0)
    router = DepthRouter(D, 0.25)
    decision = router(torch.randn(3, 9, D), None, RoutingContext())
    assert decision.selected.sum(1).tolist() == [expected_k(0.25, 9)] * 3
    stats = decision.stats()
    assert stats.tokens_per_expert.tolist() == [9]
    assert_close("fraction processed", torch.tensor([1 - 9 / 27, 9 / 27]), stats.fraction_routed_to, **FP32)


def test_router_bad_arguments():
    for capacity in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"capacity must be in \(0, 1\]"):
            DepthRouter(D, capacity)
    with pytest.raises(ValueError, match="unknown depth gate"):
        DepthRouter(D, 0.5, gate="softmax")
    with pytest.raises(ValueError, match="expects d_model 32"):
        DepthRouter(D, 0.5)(torch.randn(2, 4, D + 1), None, RoutingContext())


# ----------------------------------------------------------------------------- gather_selected


def test_gather_selected_uneven_rows():
    selected = torch.tensor([[0, 1, 1, 0, 1, 0],
                             [1, 0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    index, valid = gather_selected(selected)
    assert index.shape == valid.shape == (4, 6)
    expected_valid = torch.arange(6) < selected.sum(1, keepdim=True)
    assert torch.equal(valid, expected_valid)
    for b in range(4):
        assert index[b, valid[b]].tolist() == selected[b].nonzero()[:, 0].tolist()  # in order
        assert bool((index[b, ~valid[b]] == 0).all())  # padding points at position 0


@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (2, 0)], ids=["none-selected", "B0", "L0"])
def test_gather_selected_empty(shape):
    index, valid = gather_selected(torch.zeros(shape, dtype=torch.bool))
    assert index.shape == valid.shape == (shape[0], 0)


# ----------------------------------------------------------------------------- execution paths


def loop_reference(block: TransformerBlock, x, modality_ids, positions, decision, split: bool) -> torch.Tensor:
    """Row by row: the block on the row's selected tokens (with their positions), x + w * (out - x)."""
    y = x.clone()
    for b in range(x.shape[0]):
        sel = decision.selected[b].nonzero()[:, 0]
        xs, mods = x[b, sel][None], modality_ids[b, sel][None]
        out = block.process(xs, mods, routing_of(mods, split), positions[sel])[0]
        y[b, sel] = xs[0] + decision.weights[b, sel, None] * (out - xs[0])
    return y


PATH_CASES = [dict(split=False, routable=None), dict(split=True, routable=None),
              dict(split=False, routable=[1]), dict(split=True, routable=[1, 2])]
PATH_IDS = ["dense-route-all", "mot-route-all", "dense-route-image", "mot-route-image-speech"]


@pytest.mark.parametrize("case", PATH_CASES, ids=PATH_IDS)
def test_gathered_equals_masked_equals_loop(case):
    split = case["split"]
    block = make_block(split, capacity=0.3, routable_modalities=case["routable"])
    depth = block.depth
    B, L = 3, 17
    x, mod = inputs(B, L)
    x.requires_grad_(True)
    positions = torch.arange(L)
    decision = depth.router(x, depth.routable(mod), RoutingContext())
    counts = decision.selected.sum(1)
    assert (len(set(counts.tolist())) > 1) == (case["routable"] is not None)  # restricted routing: padding
    ctx = RoutingContext()
    gathered = depth.forward_gathered(block.process, x, mod, positions, decision, ctx)
    masked = depth.forward_masked(block.process, x, mod, routing_of(mod, split), positions, decision, None, ctx)
    reference = loop_reference(block, x, mod, positions, decision, split)
    assert_close("gathered vs loop", reference, gathered, **FP32)
    assert_close("masked vs loop", reference, masked, **FP32)
    skipped = ~decision.selected
    assert skipped.any()
    for name, y in (("gathered", gathered), ("masked", masked)):
        assert torch.equal(y[skipped], x[skipped]), f"{name}: skipped tokens changed"
    # gradients of x, the router and every block weight, against a random cotangent
    params = dict(block.named_parameters(remove_duplicate=False))
    wrt = [x] + [p for n, p in params.items() if ".predictor." not in n]
    g = torch.randn_like(x)
    ref_grads = torch.autograd.grad(reference, wrt, g, retain_graph=True)
    for path, y in (("gathered", gathered), ("masked", masked)):
        for name, r, o in zip(["x"] + [n for n in params if ".predictor." not in n], ref_grads,
                              torch.autograd.grad(y, wrt, g, retain_graph=True)):
            assert_close(f"{path} grad {name}", r, o, **FP32)
    # the layer's own forward takes the gathered path outside causal mode
    assert_close("forward", gathered, block(x, mod, routing_of(mod, split), positions), **FP32)


@pytest.mark.parametrize("gate", ["sigmoid", "linear"])
def test_router_weight_gets_a_gradient(gate):
    block = make_block(True, capacity=0.25, gate=gate)
    x, mod = inputs(2, 16)
    x.requires_grad_(True)
    ctx = RoutingContext()
    y = block(x, mod, routing_of(mod, True), torch.arange(16), ctx=ctx)
    y.mul(torch.randn_like(y)).sum().backward()
    router = block.depth.router
    assert router.weight.grad is not None and torch.count_nonzero(router.weight.grad) > 0
    assert all(p.grad is None for p in router.predictor.parameters())  # no aux loss was asked for
    assert ctx.aux_losses == [] and "layers.0.depth" in ctx.stats


# ----------------------------------------------------------------------------- causal decisions


def test_causal_decision_comes_from_the_predictor_per_token():
    torch.manual_seed(0)
    router = DepthRouter(D, 0.25)
    B, L, t = 2, 12, 5
    x = torch.randn(B, L, D)
    routable = torch.rand(B, L) < 0.7
    decision = router(x, routable, RoutingContext(causal=True))
    predicted = router.predictor(x.reshape(-1, D)).view(B, L) > 0
    assert torch.equal(decision.selected, (predicted & routable) | ~routable)
    assert 0 < int((decision.selected & routable).sum()) < int(routable.sum())  # a real mix of decisions
    # other tokens (and their number) do not change token t's decision or weight
    x2 = torch.cat([5 * torch.randn(B, 3, D), x[:, t:t + 1], 5 * torch.randn(B, 7, D)], dim=1)
    routable2 = torch.cat([torch.ones(B, 3, dtype=torch.bool), routable[:, t:t + 1],
                           torch.zeros(B, 7, dtype=torch.bool)], dim=1)
    decision2 = router(x2, routable2, RoutingContext(causal=True))
    assert torch.equal(decision2.selected[:, 3], decision.selected[:, t])
    assert torch.equal(decision2.weights[:, 3], decision.weights[:, t])


def test_train_aux_routers_bce_reaches_only_the_predictor():
    block = make_block(True, capacity=0.25, routable_modalities=[1, 2])
    router = block.depth.router
    x, mod = inputs(3, 14)
    x.requires_grad_(True)
    routable = block.depth.routable(mod)
    ctx = RoutingContext(train_aux_routers=True)
    y = block(x, mod, routing_of(mod, True), torch.arange(14), ctx=ctx)
    assert len(ctx.aux_losses) == 1
    (loss,) = ctx.aux_losses
    target = router.top_k(x @ router.weight[0], routable)
    predicted = router.predictor(x.reshape(-1, D)).view(3, 14)
    manual = F.binary_cross_entropy(torch.sigmoid(predicted[routable]), target[routable].float())
    assert_close("bce", manual, loss, **FP32)
    params = dict(block.named_parameters())
    grads = torch.autograd.grad(loss, [x, *params.values()], allow_unused=True)
    assert grads[0] is None  # the predictor reads the detached residual stream
    for (name, _), g in zip(params.items(), grads[1:]):
        if ".predictor." in name:
            assert g is not None and torch.count_nonzero(g) > 0, name
        else:
            assert g is None, f"{name} gets a gradient from the aux loss"
    assert y.shape == x.shape


def test_no_aux_loss_without_routable_tokens():
    block = make_block(False, capacity=0.5, routable_modalities=[2])
    x, _ = inputs(2, 6)
    text = torch.zeros(2, 6, dtype=torch.long)
    ctx = RoutingContext(train_aux_routers=True)
    y = block(x, text, None, torch.arange(6), ctx=ctx)
    assert ctx.aux_losses == []  # nothing routable: no BCE (a mean over no tokens would be NaN)
    assert_close("all processed", block.process(x, text, None, torch.arange(6)), y, **FP32)
