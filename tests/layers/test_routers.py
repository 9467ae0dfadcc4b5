"""Routers: MoMa expert choice (+ auxiliary routers), token-choice top-k with its losses, MixER K-means."""
import math

import pytest
import torch
import torch.nn.functional as F

from momoe.layers.experts import ExpertFFN, dispatch_combine, run_experts
from momoe.layers.routers import ExpertChoiceRouter, KMeansRouter, TokenChoiceRouter
from tests.utils import TOLERANCES, assert_close, case_id

FP32 = TOLERANCES[torch.float32]

# ----------------------------------------------------------------------------- expert choice

EC_CASES = [dict(T=12, E=4, cf=1.0), dict(T=10, E=4, cf=1.2), dict(T=7, E=3, cf=2.0), dict(T=5, E=2, cf=2.0),
            dict(T=9, E=8, cf=0.5)]


@pytest.mark.parametrize("case", EC_CASES, ids=[case_id(**c) for c in EC_CASES])
def test_expert_choice_picks_top_c_tokens_per_expert(case):
    torch.manual_seed(0)
    T, E, cf = case["T"], case["E"], case["cf"]
    router = ExpertChoiceRouter(16, E, capacity_factor=cf)
    x = torch.randn(T, 16)
    routing = router(x)
    C = math.ceil(round(cf * T / E, 9))
    assert router.capacity(T) == C and 1 <= C <= T
    assert routing.sizes.tolist() == [C] * E
    assert routing.stats.tokens_per_expert.tolist() == [C] * E
    logits = x @ router.weight.t()
    assert_close("logits", logits, routing.logits, **FP32)
    for e in range(E):
        picked = routing.token_index[e * C:(e + 1) * C]
        assert len(set(picked.tolist())) == C
        # the picked tokens are the C highest logits of expert e: none left out scores higher
        left_out = torch.ones(T, dtype=torch.bool)
        left_out[picked] = False
        if left_out.any():
            assert logits[picked, e].min() >= logits[left_out, e].max()
        assert_close(f"gates of expert {e}", torch.sigmoid(logits[picked, e]), routing.gates[e * C:(e + 1) * C], **FP32)
    assert torch.equal(routing.expert_index, torch.arange(E).repeat_interleave(C))


def test_expert_choice_capacity_is_over_the_whole_batch():
    """Tokens of 2 sequences of 8 (T = 16): with E = 2 and factor 1 each expert takes C = 8 tokens from the
    whole batch, so an expert that prefers sequence 0 takes all 8 of them and none of sequence 1."""
    router = ExpertChoiceRouter(2, 2, capacity_factor=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    B, L = 2, 8
    x = torch.zeros(B, L, 2)
    x[0, :, 0], x[1, :, 1] = 1.0 + torch.arange(L), 1.0 + torch.arange(L)
    routing = router(x.reshape(B * L, 2))
    assert router.capacity(B * L) == 8
    assert sorted(routing.token_index[:8].tolist()) == list(range(8))  # expert 0: all of sequence 0
    assert sorted(routing.token_index[8:].tolist()) == list(range(8, 16))


def test_expert_choice_statistics():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(8, 4, capacity_factor=1.5)
    x = torch.randn(20, 8)
    routing = router(x)
    counts = torch.zeros(20, dtype=torch.long).index_add_(0, routing.token_index, torch.ones_like(routing.token_index))
    expected = torch.stack([(counts == n).float().mean() for n in range(5)])
    assert_close("fraction_routed_to", expected, routing.stats.fraction_routed_to, atol=0, rtol=0)
    assert math.isclose(float(routing.stats.fraction_routed_to.sum()), 1.0, rel_tol=1e-6)
    mean_experts = float((torch.arange(5) * routing.stats.fraction_routed_to).sum())
    assert math.isclose(mean_experts, 4 * router.capacity(20) / 20, rel_tol=1e-6)
    assert torch.equal(routing.selection_mask().sum(1), counts)


def test_expert_choice_forward_matches_per_expert_reference_and_trains_the_router():
    torch.manual_seed(0)
    router, experts = ExpertChoiceRouter(8, 3, capacity_factor=1.0), ExpertFFN(8, 16, 3)
    x = torch.randn(10, 8, requires_grad=True)
    routing = router(x)
    y = run_experts(x, routing.token_index, routing.gates, routing.sizes, experts)
    y_ref = torch.zeros(10, 8)
    mask = routing.selection_mask()
    for e in range(3):  # reference: each expert on the tokens it picked, weighted by sigmoid(logit)
        for t in mask[:, e].nonzero()[:, 0].tolist():
            h = F.linear(x[t], experts.w13[e])
            out = F.linear(F.silu(h[:16]) * h[16:], experts.w2[e])
            y_ref[t] += torch.sigmoid(x[t] @ router.weight[e]) * out
    assert_close("y", y_ref, y, **FP32)
    y.square().sum().backward()
    assert router.weight.grad is not None and torch.count_nonzero(router.weight.grad) > 0
    assert all(p.grad is None for p in router.aux_router.parameters())


def test_expert_choice_empty_batch():
    routing = ExpertChoiceRouter(8, 4)(torch.randn(0, 8))
    assert routing.token_index.numel() == 0 and routing.sizes.tolist() == [0, 0, 0, 0]


def test_expert_choice_gumbel_noise_only_in_training():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(8, 4, gumbel_noise=True)
    x = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(x).token_index, router(x).token_index)
    router.train()
    assert not torch.equal(router(x).token_index, router(x).token_index)


def test_aux_router_bce_decreases_with_main_router_frozen():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(16, 4, capacity_factor=1.0)
    x = torch.randn(256, 16)
    with torch.no_grad():
        routing = router(x)  # stage 2: the expert-choice decisions of the frozen model are the targets
    weight_before = router.weight.detach().clone()
    opt = torch.optim.Adam(router.aux_router.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = router.aux_router_loss(x, routing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert router.weight.grad is None and torch.equal(router.weight, weight_before)
    target = routing.selection_mask().float()
    manual = F.binary_cross_entropy(torch.sigmoid(router.aux_router(x)), target)
    assert_close("bce", manual, router.aux_router_loss(x, routing), **FP32)
    # trained aux routers agree with expert choice on most (token, expert) pairs
    accuracy = ((router.aux_router(x) > 0).float() == target).float().mean()
    assert accuracy > 0.9  # the base rate (always "not picked") is 0.75


def test_causal_routing_is_per_token():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(16, 4)
    x = torch.randn(24, 16)
    routing = router(x, causal=True)
    accepted = router.aux_router(x) > 0
    assert torch.equal(routing.selection_mask(), accepted)
    assert torch.equal(routing.sizes, accepted.sum(0))
    main_gates = torch.sigmoid(routing.logits[routing.token_index, routing.expert_index])
    assert_close("gates", main_gates, routing.gates, **FP32)
    # changing the later tokens (and how many there are) leaves the decisions of the earlier ones alone
    t = 10
    changed = router(torch.cat([x[:t], 5 * torch.randn(30, 16)]), causal=True)
    gates_a = torch.zeros(24, 4).index_put_((routing.token_index, routing.expert_index), routing.gates)
    gates_b = torch.zeros(40, 4).index_put_((changed.token_index, changed.expert_index), changed.gates)
    assert torch.equal(changed.selection_mask()[:t], routing.selection_mask()[:t])
    assert torch.equal(gates_a[:t], gates_b[:t])


@pytest.mark.parametrize("cf", [0.0, -1.0, 4.5])
def test_expert_choice_bad_capacity_factor(cf):
    with pytest.raises(ValueError, match=r"capacity_factor must be in \(0, num_experts = 4\]"):
        ExpertChoiceRouter(8, 4, capacity_factor=cf)


def test_expert_choice_bad_config_and_input():
    with pytest.raises(ValueError, match="num_experts >= 1"):
        ExpertChoiceRouter(8, 0)
    with pytest.raises(ValueError, match="aux_hidden"):
        ExpertChoiceRouter(8, 2, aux_hidden=0)
    with pytest.raises(ValueError, match=r"shape \(rows, 8\)"):
        ExpertChoiceRouter(8, 2)(torch.randn(3, 7))
    assert ExpertChoiceRouter(8, 4, capacity_factor=4.0).capacity(10) == 10  # factor E: every expert takes all


# ----------------------------------------------------------------------------- token choice


def test_load_balance_loss_is_one_for_uniform_routing():
    E, k = 4, 2
    # uniform router probabilities: all-zero router weights
    router = TokenChoiceRouter(8, E, top_k=k)
    with torch.no_grad():
        router.weight.zero_()
    assert_close("lb (uniform probs)", torch.tensor(1.0), router(torch.randn(32, 8)).load_balance_loss, **FP32)
    # uniform dispatch with peaked probabilities: token t's top-2 are experts t % 4 and (t + 1) % 4
    with torch.no_grad():
        router.weight.copy_(torch.eye(E, 8))
    x = torch.zeros(32, 8)
    x[torch.arange(32), torch.arange(32) % E] = 6.0
    x[torch.arange(32), (torch.arange(32) + 1) % E] = 5.0
    routing = router(x)
    assert routing.stats.tokens_per_expert.tolist() == [16] * E
    assert_close("lb (uniform dispatch)", torch.tensor(1.0), routing.load_balance_loss, **FP32)


def test_load_balance_loss_formula_and_collapse():
    torch.manual_seed(0)
    E, k, T = 6, 2, 40
    router = TokenChoiceRouter(12, E, top_k=k)
    x = torch.randn(T, 12)
    routing = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    f = torch.stack([(routing.expert_ids == e).sum() for e in range(E)]).float() / (T * k)
    assert_close("lb", E * (f * probs.mean(0)).sum(), routing.load_balance_loss, **FP32)
    # every token confidently on experts 0 and 1: f = (1/2, 1/2, 0...), P -> (1/2, 1/2, 0...), lb -> E/2
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:2, 0] = 100.0
    collapsed = router(torch.ones(T, 12)).load_balance_loss
    assert_close("lb (collapsed)", torch.tensor(E / 2), collapsed, atol=1e-3, rtol=1e-3)


def test_z_loss_and_aux_loss():
    torch.manual_seed(0)
    router = TokenChoiceRouter(12, 5, top_k=1, load_balance_coef=0.3, z_loss_coef=0.7)
    x = torch.randn(17, 12)
    routing = router(x)
    logits = x @ router.weight.t()
    assert_close("z", torch.logsumexp(logits, -1).square().mean(), routing.z_loss, **FP32)
    assert_close("aux", 0.3 * routing.load_balance_loss + 0.7 * routing.z_loss, routing.aux_loss, **FP32)


@pytest.mark.parametrize("k,renormalize", [(1, False), (2, False), (2, True), (3, True)],
                         ids=[case_id(k=k, renormalize=r) for k, r in [(1, False), (2, False), (2, True), (3, True)]])
def test_token_choice_top_k(k, renormalize):
    torch.manual_seed(0)
    router = TokenChoiceRouter(12, 6, top_k=k, renormalize=renormalize)
    x = torch.randn(30, 12)
    routing = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    assert routing.expert_ids.shape == routing.gates.shape == (30, k)
    for t in range(30):
        chosen = set(routing.expert_ids[t].tolist())
        assert len(chosen) == k
        others = [e for e in range(6) if e not in chosen]
        if others:
            assert probs[t, routing.expert_ids[t]].min() >= probs[t, others].max()
    picked = probs.gather(1, routing.expert_ids)
    expected = picked / picked.sum(-1, keepdim=True) if renormalize else picked
    assert_close("gates", expected, routing.gates, **FP32)
    assert routing.stats.fraction_routed_to[k] == 1.0 and routing.stats.fraction_routed_to.sum() == 1.0
    assert routing.stats.tokens_per_expert.sum() == 30 * k


def test_token_choice_gradients_reach_the_router():
    torch.manual_seed(0)
    router, experts = TokenChoiceRouter(8, 4, top_k=2), ExpertFFN(8, 16, 4)
    x = torch.randn(12, 8, requires_grad=True)
    routing = router(x)
    y = dispatch_combine(x, routing.expert_ids, routing.gates, experts)
    (grad_from_gates,) = torch.autograd.grad(y.square().sum(), router.weight, retain_graph=True)
    (grad_from_aux,) = torch.autograd.grad(routing.aux_loss, router.weight)
    assert torch.count_nonzero(grad_from_gates) > 0 and torch.count_nonzero(grad_from_aux) > 0


def test_token_choice_bf16_autocast_keeps_router_fp32():
    torch.manual_seed(0)
    router = TokenChoiceRouter(8, 4, top_k=2)
    x = torch.randn(10, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    assert routing.logits.dtype == routing.gates.dtype == torch.float32
    assert_close("logits", x @ router.weight.t(), routing.logits, **FP32)


def test_token_choice_empty_batch():
    routing = TokenChoiceRouter(8, 4)(torch.randn(0, 8))
    assert routing.expert_ids.shape == (0, 2)
    assert routing.aux_loss.item() == 0.0


def test_token_choice_bad_config():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts = 4\]"):
        TokenChoiceRouter(8, 4, top_k=5)
    with pytest.raises(ValueError, match=r"top_k must be in"):
        TokenChoiceRouter(8, 4, top_k=0)
    with pytest.raises(ValueError, match="z_loss_coef must be >= 0"):
        TokenChoiceRouter(8, 4, z_loss_coef=-1.0)
    with pytest.raises(ValueError, match="num_experts >= 1"):
        TokenChoiceRouter(8, 0)


# ----------------------------------------------------------------------------- K-means (MixER)


def clusters(num: int, per: int, dim: int, seed: int = 0):
    """Well-separated synthetic clusters: means (num, dim) ~ 10 N(0, 1), points = mean + 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    means = 10 * torch.randn(num, dim, generator=g)
    labels = torch.arange(num).repeat(per)
    points = means[labels] + 0.1 * torch.randn(num * per, dim, generator=g)
    return points, labels


def matched_centroids(router: KMeansRouter, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The centroid each true cluster is routed to, checking the clusters map to distinct experts."""
    ids = router.assign(points)
    expert_of_cluster = torch.stack([ids[labels == c].mode().values for c in range(int(labels.max()) + 1)])
    assert len(set(expert_of_cluster.tolist())) == len(expert_of_cluster)
    assert torch.equal(ids, expert_of_cluster[labels])  # every point of a cluster goes to one expert
    return router.centroids[expert_of_cluster]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_centroids_move_to_cluster_means(seed):
    torch.manual_seed(seed)
    points, labels = clusters(4, 25, 6, seed)
    means = torch.stack([points[labels == c].mean(0) for c in range(4)])
    router = KMeansRouter(6, 4, kmeans_iters=1)
    for _ in range(5):
        router(points[torch.randperm(100)])
    assert_close("centroids", means, matched_centroids(router, points, labels), atol=1e-4, rtol=1e-4)


def test_kmeans_ema_converges_geometrically():
    torch.manual_seed(0)
    points, labels = clusters(3, 20, 4)
    means = torch.stack([points[labels == c].mean(0) for c in range(3)])
    router = KMeansRouter(4, 3, kmeans_iters=5, ema_decay=0.5)
    router.init_centroids(points)
    errors = []
    for _ in range(12):
        router(points)
        errors.append((matched_centroids(router, points, labels) - means).abs().max().item())
    assert errors[-1] < 1e-2 * errors[0] + 1e-5
    assert all(b <= 0.5 * a + 1e-5 for a, b in zip(errors, errors[1:]))


def test_kmeans_routes_sequences_and_gets_no_gradients():
    torch.manual_seed(0)
    router, experts = KMeansRouter(5, 3), ExpertFFN(8, 16, 3)
    B, L = 9, 4
    context = torch.randn(B, 5, requires_grad=True)
    x = torch.randn(B * L, 8, requires_grad=True)
    routing = router(context)
    assert list(router.parameters()) == [] and not router.centroids.requires_grad
    assert {name for name, _ in router.named_buffers()} == {"centroids", "initialized"}
    assert routing.expert_ids.grad_fn is None and routing.gates.grad_fn is None
    assert torch.equal(routing.gates, torch.ones(B))
    y = dispatch_combine(x, routing.expert_ids.repeat_interleave(L), routing.gates.repeat_interleave(L), experts)
    y.square().sum().backward()
    assert context.grad is None and x.grad is not None
    tokens_of_seq = y.reshape(B, L, 8)
    ids = routing.expert_ids
    for b in range(B):  # all tokens of a sequence use the expert of the sequence's context
        alone = dispatch_combine(x[b * L:(b + 1) * L], ids[b].repeat(L), torch.ones(L), experts)
        assert_close(f"sequence {b}", alone, tokens_of_seq[b], **FP32)


def test_kmeans_assignment_is_nearest_centroid_and_eval_is_frozen():
    torch.manual_seed(0)
    router = KMeansRouter(3, 5)
    centroids = torch.randn(5, 3)
    router.load_state_dict({"centroids": centroids, "initialized": torch.tensor(True)})
    router.eval()
    context = torch.randn(50, 3)
    routing = router(context)
    distances = ((context[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert torch.equal(routing.expert_ids, distances.argmin(-1))
    assert torch.equal(router.centroids, centroids)  # eval mode: no update
    assert routing.stats.tokens_per_expert.tolist() == torch.bincount(distances.argmin(-1), minlength=5).tolist()
    assert routing.stats.fraction_routed_to[1] == 1.0


def test_kmeans_empty_cluster_keeps_its_centroid():
    router = KMeansRouter(2, 3, kmeans_iters=3)
    far = torch.tensor([[100.0, 100.0]])
    router.load_state_dict({"centroids": torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0]]),
                            "initialized": torch.tensor(True)})
    router(torch.tensor([[0.0, 0.1], [0.2, 0.0], [1.0, 0.1], [1.2, -0.1]]))
    assert torch.equal(router.centroids[2:], far)
    assert_close("cluster 0", torch.tensor([0.1, 0.05]), router.centroids[0], **FP32)
    assert_close("cluster 1", torch.tensor([1.1, 0.0]), router.centroids[1], **FP32)


def test_kmeans_bad_config_and_use():
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        KMeansRouter(4, 2, ema_decay=1.0)
    with pytest.raises(ValueError, match="kmeans_iters must be >= 1"):
        KMeansRouter(4, 2, kmeans_iters=0)
    with pytest.raises(ValueError, match="num_experts >= 1"):
        KMeansRouter(4, 0)
    router = KMeansRouter(4, 3)
    with pytest.raises(ValueError, match="no centroids yet"):
        router.eval()(torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 3 context vectors"):
        router.train()(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"shape \(rows, 4\)"):
        router(torch.randn(6, 5))
