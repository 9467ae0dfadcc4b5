"""MoMa's modality-aware experts against a plain per-group, per-expert reference (expert choice inside
each modality group, sigmoid gates, single-expert groups taking all their tokens), causal routing by the
auxiliary routers, their BCE, bad inputs, bf16 autocast."""
import math

import pytest
import torch
import torch.nn.functional as F

from momoe.layers.modality_experts import ModalityExperts
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.routers import RoutingContext
from tests.utils import TOLERANCES, assert_close

FP32 = TOLERANCES[torch.float32]
D, FF = 16, 24
NAMES = ["text", "image", "speech"]


def make_experts(experts_per_modality, capacity_factor=1.0, seed=0) -> ModalityExperts:
    torch.manual_seed(seed)
    return ModalityExperts(D, FF, experts_per_modality, NAMES[:len(experts_per_modality)],
                           capacity_factor=capacity_factor)


def expert_ffn(moe: ModalityExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the bank on rows x: (R, D), with plain matmuls: w2 (silu(gate) * up)."""
    h = x @ moe.experts.w13[e].t()  # (R, 2F)
    return (F.silu(h[:, :FF]) * h[:, FF:]) @ moe.experts.w2[e].t()


def reference(moe: ModalityExperts, x: torch.Tensor, modality: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """x: (T, D), modality: (T,) -> (T, D). Expert e of group m takes the top-C tokens of the group by its
    router logit, C = ceil(cf * T_m / E_m) (causal: the tokens its auxiliary router accepts), and adds
    sigmoid(logit) * expert(x_t); a single-expert group takes every token of its modality with weight 1."""
    y = torch.zeros_like(x)
    first = 0
    for m, (name, E_m) in enumerate(zip(moe.modality_names, moe.experts_per_modality)):
        tokens = (modality == m).nonzero()[:, 0]
        for e in range(E_m):
            if E_m == 1:
                picked, gate = tokens, torch.ones(len(tokens))
            else:
                router = moe.routers[name]
                logits = x[tokens] @ router.weight[e]  # (T_m,)
                if causal:
                    top = (router.aux_router(x[tokens])[:, e] > 0).nonzero()[:, 0]
                else:
                    top = logits.topk(min(len(tokens), math.ceil(router.capacity_factor * len(tokens) / E_m))).indices
                picked, gate = tokens[top], torch.sigmoid(logits[top])
            y = y.index_add(0, picked, gate[:, None] * expert_ffn(moe, first + e, x[picked]))
        first += E_m
    return y


def token_modalities(kind: str, num_modalities: int, gen: torch.Generator) -> torch.Tensor:
    """(B, L) modality ids: 'odd' (odd token counts), 'missing' (modality 1 absent), 'empty' (T = 0)."""
    if kind == "empty":
        return torch.zeros(2, 0, dtype=torch.long)
    mod = torch.randint(0, num_modalities, (3, 13), generator=gen)
    if kind == "missing":
        mod[mod == 1] = 0
    return mod


GROUPS = [[4, 2], [1, 3, 2]]
CASES = [(groups, cf, kind) for groups in GROUPS for cf in (1.0, 2.0) for kind in ("odd", "missing", "empty")]


def case_name(groups, cf, kind) -> str:
    return f"E{'-'.join(map(str, groups))}-cf{cf}-{kind}"


@pytest.mark.parametrize("groups,cf,kind", CASES, ids=[case_name(*c) for c in CASES])
def test_forward_and_gradients_match_reference(groups, cf, kind):
    moe = make_experts(groups, cf)
    gen = torch.Generator().manual_seed(1)
    mod = token_modalities(kind, len(groups), gen)
    x = torch.randn(*mod.shape, D, generator=gen, requires_grad=True)
    ctx = RoutingContext()
    y = moe(x, ModalityRouting.from_ids(mod, len(groups)), ctx, name="layers.0.experts")
    y_ref = reference(moe, x.reshape(-1, D), mod.reshape(-1)).reshape(x.shape)
    assert y.shape == x.shape
    assert_close("y", y_ref, y, **FP32)
    routed = [n for n, e in zip(moe.modality_names, groups) if e > 1]
    assert sorted(ctx.stats) == sorted(f"layers.0.experts.{n}" for n in routed)
    params = dict(moe.named_parameters())
    g = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, [x, *params.values()], g, allow_unused=True)
    ref_grads = torch.autograd.grad(y_ref, [x, *params.values()], g, allow_unused=True)
    for name, r, o in zip(["x", *params], ref_grads, grads):
        if ".aux_router." in name:  # only the aux loss trains them
            assert r is None and o is None, name
            continue
        zeros = torch.zeros_like(x if name == "x" else params[name])
        assert_close(f"grad {name}", zeros if r is None else r, zeros if o is None else o, **FP32)


def test_single_expert_groups_take_every_token_with_weight_one():
    moe = make_experts([1, 1])
    mod = torch.tensor([[0, 1, 1, 0, 0, 1, 0]])
    x = torch.randn(1, 7, D)
    y = moe(x, ModalityRouting.from_ids(mod, 2))
    expected = torch.stack([expert_ffn(moe, int(m), x[0, t:t + 1])[0] for t, m in enumerate(mod[0].tolist())])
    assert_close("y", expected[None], y, **FP32)
    assert len(moe.routers) == 0


def test_causal_mode_is_per_token():
    moe = make_experts([1, 3, 2])
    gen = torch.Generator().manual_seed(2)
    mod = torch.randint(0, 3, (2, 9), generator=gen)
    x = torch.randn(2, 9, D, generator=gen)
    y = moe(x, ModalityRouting.from_ids(mod, 3), RoutingContext(causal=True))
    assert_close("y vs reference", reference(moe, x.reshape(-1, D), mod.reshape(-1), causal=True),
                 y.reshape(-1, D), **FP32)
    x_flat, mod_flat = x.reshape(-1, D), mod.reshape(-1)
    for t in range(x_flat.shape[0]):  # each token on its own gives the same output
        alone = moe(x_flat[t:t + 1], ModalityRouting.from_ids(mod_flat[t:t + 1], 3), RoutingContext(causal=True))
        assert_close(f"token {t}", y.reshape(-1, D)[t:t + 1], alone, **FP32)
    # the decisions are a real mix: some routed tokens taken by no expert, some by several
    experts_per_token = torch.cat([moe.routers[name].aux_router(x_flat[mod_flat == m]).gt(0).sum(1)
                                   for m, name in ((1, "image"), (2, "speech"))])
    assert (experts_per_token == 0).any() and (experts_per_token > 1).any()


def test_train_aux_routers_one_loss_per_routed_group():
    moe = make_experts([1, 3, 2])
    gen = torch.Generator().manual_seed(3)
    mod = torch.randint(0, 3, (2, 11), generator=gen)
    x = torch.randn(2, 11, D, generator=gen)
    routing = ModalityRouting.from_ids(mod, 3)
    ctx = RoutingContext(train_aux_routers=True)
    moe(x, routing, ctx)
    assert len(ctx.aux_losses) == 2  # image and speech; text has a single expert
    x_img = x.reshape(-1, D)[mod.reshape(-1) == 1]
    router = moe.routers["image"]
    target = router(x_img).selection_mask().float()
    manual = F.binary_cross_entropy(torch.sigmoid(router.aux_router(x_img)), target)
    assert_close("image bce", manual, ctx.aux_losses[0], **FP32)
    # a routed group without tokens in the batch has nothing to learn from: no loss (never a NaN)
    ctx = RoutingContext(train_aux_routers=True)
    moe(x, ModalityRouting.from_ids(torch.where(mod == 1, 0, mod), 3), ctx)
    assert len(ctx.aux_losses) == 1 and bool(torch.isfinite(ctx.total_aux_loss(x)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="one entry per modality"):
        ModalityExperts(D, FF, [4, 2], ["text"])
    with pytest.raises(ValueError, match="at least one expert"):
        ModalityExperts(D, FF, [4, 0], ["text", "image"])
    with pytest.raises(ValueError, match="capacity_factor"):
        ModalityExperts(D, FF, [4, 2], ["text", "image"], capacity_factor=3.0)
    moe = make_experts([4, 2])
    with pytest.raises(ValueError, match="routing is for 6 tokens"):
        moe(torch.randn(7, D), ModalityRouting.from_ids(torch.zeros(6, dtype=torch.long), 2))
    with pytest.raises(ValueError, match="train_aux_routers needs causal=False"):
        RoutingContext(causal=True, train_aux_routers=True)


def test_bf16_autocast_close_to_fp32():
    moe = make_experts([4, 2])
    gen = torch.Generator().manual_seed(4)
    mod = torch.randint(0, 2, (2, 15), generator=gen)
    x = torch.randn(2, 15, D, generator=gen)
    routing = ModalityRouting.from_ids(mod, 2)
    y32 = moe(x, routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = moe(x, routing)
    assert y16.dtype == torch.bfloat16
    assert_close("bf16 vs fp32", y32, y16, atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------- token choice


def token_choice_reference(moe: ModalityExperts, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Every token of a routed group goes to its top-k experts by softmax probability, weighted by it."""
    y = torch.zeros_like(x)
    first = 0
    for m, (name, E_m) in enumerate(zip(moe.modality_names, moe.experts_per_modality)):
        for t in (modality == m).nonzero()[:, 0].tolist():
            if E_m == 1:
                y[t] = expert_ffn(moe, first, x[t:t + 1])[0]
                continue
            router = moe.routers[name]
            probs = (x[t] @ router.weight.t()).softmax(-1)
            gates, experts = probs.topk(router.top_k)
            for g, e in zip(gates, experts.tolist()):
                y[t] = y[t] + g * expert_ffn(moe, first + e, x[t:t + 1])[0]
        first += E_m
    return y


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_choice_matches_reference_and_adds_its_losses(top_k):
    torch.manual_seed(0)
    moe = ModalityExperts(D, FF, [4, 2, 1], NAMES, routing="token_choice", top_k=top_k)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 13, D, generator=gen, requires_grad=True)
    mod = torch.randint(0, 3, (3, 13), generator=gen)
    ctx = RoutingContext()
    y = moe(x, ModalityRouting.from_ids(mod, 3), ctx)
    ref = token_choice_reference(moe, x.reshape(-1, D), mod.reshape(-1)).view_as(x)
    assert_close("token choice", ref, y, **FP32)
    g = torch.randn_like(y)
    params = [x] + list(moe.experts.parameters()) + [r.weight for r in moe.routers.values()]
    for r, o in zip(torch.autograd.grad(ref, params, g), torch.autograd.grad(y, params, g)):
        assert_close("grad", r, o, **FP32)
    assert len(ctx.aux_losses) == 2 and set(ctx.stats) == {"experts.text", "experts.image"}
    assert moe.active_experts_per_token() == [float(top_k), float(top_k), 1.0]
    stage2 = RoutingContext(train_aux_routers=True)  # no balancing loss in the auxiliary routers' stage
    moe(x, ModalityRouting.from_ids(mod, 3), stage2)
    assert stage2.aux_losses == []


def test_token_choice_bad_routing():
    with pytest.raises(ValueError, match="expert routing"):
        ModalityExperts(D, FF, [2, 2], NAMES[:2], routing="hash")
