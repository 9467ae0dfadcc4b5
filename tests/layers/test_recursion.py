"""Mixture-of-Recursions routing: the packed layout of a step's active tokens, expert choice (per-sequence
top-k among the previous step's tokens, gates, causal decisions, auxiliary losses) and token choice
(depths, gates, balancing and z losses) against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from momoe.layers.recursion import (ActiveTokens, RecursionExpertChoiceRouter, RecursionTokenChoiceRouter,
                                    default_capacity)
from momoe.layers.routers import RoutingContext
from tests.utils import TOLERANCES, assert_close

FP32 = TOLERANCES[torch.float32]
D = 16


def test_active_tokens_are_packed_right_aligned_in_time_order():
    gen = torch.Generator().manual_seed(0)
    active = torch.rand(4, 9, generator=gen) < 0.5
    active[2] = False  # a row without active tokens
    packed = ActiveTokens.from_mask(active)
    counts = active.sum(1)
    assert packed.width == int(counts.max())
    for b in range(4):
        c = int(counts[b])
        assert packed.valid[b].tolist() == [False] * (packed.width - c) + [True] * c
        times = packed.time(9)[b]
        assert times[packed.valid[b]].tolist() == active[b].nonzero()[:, 0].tolist()  # in time order
        assert (packed.index[b] // 9 == b).all()  # padding points into the row too, at inactive tokens
        assert not active[b, times[~packed.valid[b]]].any()
    example = ActiveTokens.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
    assert example.index.tolist() == [[0, 2], [5, 4]] and example.valid.tolist() == [[True, True], [False, True]]
    assert ActiveTokens.from_mask(torch.zeros(2, 3, dtype=torch.bool)).width == 0
    with pytest.raises(ValueError, match="bool"):
        ActiveTokens.from_mask(torch.ones(2, 3))


def test_default_capacity_schedule():
    assert default_capacity(3) == [1.0, 2 / 3, 1 / 3]
    assert default_capacity(1) == [1.0]


def expected_k(capacity: float, n: int) -> int:
    return min(n, max(1, math.floor(round(capacity * n, 9))))


def test_expert_choice_keeps_each_sequences_top_k_of_the_previous_steps_tokens():
    torch.manual_seed(0)
    capacity = [1.0, 0.6, 0.3]
    router = RecursionExpertChoiceRouter(D, capacity, alpha=0.1)
    x = torch.randn(3, 10, D)
    num_tokens = torch.tensor([10, 7, 4])
    real = torch.arange(10) < num_tokens[:, None]
    candidates = real
    for step, cap in enumerate(capacity):
        sel = router(x, candidates, step, num_tokens, RoutingContext())
        logits = x @ router.weight[step]
        assert_close("logits", logits, sel.logits, **FP32)
        assert_close("gates", 0.1 * torch.sigmoid(logits), sel.gates, **FP32)
        assert not (sel.selected & ~candidates).any()  # hierarchical: only the step before's tokens
        for b in range(3):
            k = expected_k(cap, int(num_tokens[b]))
            chosen = sel.selected[b]
            assert int(chosen.sum()) == k
            left_out = candidates[b] & ~chosen
            if left_out.any():
                assert logits[b, chosen].min() >= logits[b, left_out].max()
        candidates = sel.selected
    with torch.no_grad():  # x moves between steps in the model; the routers differ per step
        assert not torch.equal(router.weight[0], router.weight[1])


def test_expert_choice_causal_decisions_are_per_token():
    torch.manual_seed(0)
    router = RecursionExpertChoiceRouter(D, [1.0, 0.5], causal_router="aux-loss")
    x, candidates = torch.randn(2, 8, D), torch.rand(2, 8) < 0.7
    ctx = RoutingContext(causal=True)
    assert torch.equal(router(x, candidates, 0, torch.tensor([8, 8]), ctx).selected, candidates)  # capacity 1
    sel = router(x, candidates, 1, torch.tensor([8, 8]), ctx)
    assert torch.equal(sel.selected, candidates & (x @ router.weight[1] > 0))  # sigmoid(logit) > 0.5
    aux = RecursionExpertChoiceRouter(D, [1.0, 0.5], causal_router="aux-router")
    sel = aux(x, candidates, 1, torch.tensor([8, 8]), ctx)
    predicted = aux.aux_router(x.reshape(16, D))[:, 1].view(2, 8)
    assert torch.equal(sel.selected, candidates & (predicted > 0))


@pytest.mark.parametrize("causal_router", ["aux-loss", "aux-router"])
def test_expert_choice_auxiliary_losses(causal_router):
    torch.manual_seed(0)
    router = RecursionExpertChoiceRouter(D, [1.0, 0.5], causal_router=causal_router, aux_loss_coef=1e-3,
                                         z_loss_coef=1e-2)
    x = torch.randn(2, 8, D, requires_grad=True)
    candidates = torch.rand(2, 8) < 0.7
    ctx = RoutingContext()
    sel = router(x, candidates, 1, torch.tensor([8, 8]), ctx)
    logits = x @ router.weight[1]
    decider = logits if causal_router == "aux-loss" else router.aux_router(x.reshape(16, D))[:, 1].view(2, 8)
    bce = F.binary_cross_entropy_with_logits(decider[candidates], sel.selected[candidates].float())
    expected = 1e-3 * bce + 1e-2 * logits[candidates].square().mean()
    (loss,) = ctx.aux_losses
    assert_close("aux loss", expected, loss, **FP32)
    if causal_router == "aux-router":  # the auxiliary router learns on detached hidden states
        bce_only = RecursionExpertChoiceRouter(D, [1.0, 0.5], causal_router=causal_router, z_loss_coef=0.0)
        ctx = RoutingContext()
        bce_only(x, candidates, 1, torch.tensor([8, 8]), ctx)
        ctx.aux_losses[0].backward()
        assert (x.grad is None or not x.grad.any()) and bce_only.aux_router.w_in.weight.grad.any()
    causal = RoutingContext(causal=True)
    router(x, candidates, 1, torch.tensor([8, 8]), causal)
    assert_close("causal: z-loss only", 1e-2 * logits[candidates].square().mean(), causal.aux_losses[0], **FP32)


def test_token_choice_gives_each_token_its_depth():
    torch.manual_seed(0)
    router = RecursionTokenChoiceRouter(D, num_recursions=3, alpha=1.0, balance_loss_coef=0.1, z_loss_coef=1e-5)
    x = torch.randn(40, D)
    ctx = RoutingContext()
    routing = router(x, ctx)
    logits = x @ router.router.weight.t()
    probs = logits.softmax(-1)
    assert torch.equal(routing.depth, probs.argmax(-1) + 1)
    assert_close("gates", probs.max(-1).values, routing.gates, **FP32)
    f = torch.bincount(routing.depth - 1, minlength=3).float() / 40
    expected = 0.1 * 3 * (f * probs.mean(0)).sum() + 1e-5 * torch.logsumexp(logits, -1).square().mean()
    assert_close("aux loss", expected, ctx.aux_losses[0], **FP32)
    assert routing.tokens_per_depth.tolist() == torch.bincount(routing.depth - 1, minlength=3).tolist()


def test_bad_router_arguments():
    with pytest.raises(ValueError, match="must not increase"):
        RecursionExpertChoiceRouter(D, [0.5, 1.0])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        RecursionExpertChoiceRouter(D, [1.0, 0.0])
    with pytest.raises(ValueError, match="unknown causal_router"):
        RecursionExpertChoiceRouter(D, [1.0], causal_router="threshold")
    with pytest.raises(ValueError, match="alpha"):
        RecursionTokenChoiceRouter(D, 2, alpha=0.0)
    router = RecursionExpertChoiceRouter(D, [1.0, 0.5])
    x, candidates = torch.randn(2, 4, D), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="out of range"):
        router(x, candidates, 2, torch.tensor([4, 4]), RoutingContext())
    with pytest.raises(ValueError, match="expected x"):
        router(x, candidates[:, :3], 0, torch.tensor([4, 4]), RoutingContext())
