"""ExpertFFN against a per-expert loop, and the dispatch / combine paths against per-token references."""
import pytest
import torch
import torch.nn.functional as F

from momoe.layers.experts import ExpertFFN, dispatch_combine, run_experts
from momoe.layers.ffn import SwiGLU
from momoe.ops import use_backend
from tests.utils import TOLERANCES, assert_close, case_id


def expert_reference(experts: ExpertFFN, x_sorted: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Expert by expert, in fp32: w2[e](silu(gate) * up) on the rows of e."""
    out, start, d_ff = [], 0, experts.d_ff
    for e, n in enumerate(sizes.tolist()):
        rows = x_sorted[start:start + n].float()
        h = F.linear(rows, experts.w13[e].float())
        out.append(F.linear(F.silu(h[:, :d_ff]) * h[:, d_ff:], experts.w2[e].float()))
        start += n
    return torch.cat(out)


def token_reference(experts: ExpertFFN, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor):
    """y[t] = sum_j gates[t, j] * expert_{ids[t, j]}(x[t]), token by token."""
    rows = []
    for x_t, ids_t, g_t in zip(x, expert_ids.reshape(x.shape[0], -1), gates.reshape(x.shape[0], -1)):
        y_t = torch.zeros_like(x_t)
        for e, g in zip(ids_t.tolist(), g_t):
            y_t = y_t + g * expert_reference(experts, x_t[None], torch.eye(experts.num_experts, dtype=torch.long)[e])[0]
        rows.append(y_t)
    return torch.stack(rows)


SIZES = [[3, 0, 5, 2], [0, 0, 7], [4], [0, 0, 0], [1, 6, 0, 0, 2]]


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("sizes", SIZES, ids=[case_id(E=len(s), R=sum(s), empty=0 in s) for s in SIZES])
def test_matches_per_expert_loop(sizes, backend):
    torch.manual_seed(0)
    experts = ExpertFFN(12, 20, num_experts=len(sizes))
    sizes = torch.tensor(sizes)
    x = torch.randn(int(sizes.sum()), 12, requires_grad=True)
    with use_backend(backend):
        y = experts(x, sizes)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, experts.w13, experts.w2], g)
    y_ref = expert_reference(experts, x, sizes)
    ref_grads = torch.autograd.grad(y_ref, [x, experts.w13, experts.w2], g, allow_unused=True)
    assert_close("y", y_ref, y, **TOLERANCES[torch.float32])
    for name, r, o in zip(["dx", "dw13", "dw2"], ref_grads, grads):
        assert_close(name, torch.zeros_like(o) if r is None else r, o, **TOLERANCES[torch.float32])


def test_empty_expert_gets_zero_weight_gradient():
    torch.manual_seed(0)
    experts = ExpertFFN(8, 16, num_experts=3)
    y = experts(torch.randn(5, 8), torch.tensor([2, 0, 3]))
    y.square().sum().backward()
    assert torch.count_nonzero(experts.w13.grad[1]) == 0 and torch.count_nonzero(experts.w2.grad[1]) == 0
    assert torch.count_nonzero(experts.w13.grad[0]) > 0 and torch.count_nonzero(experts.w2.grad[2]) > 0


def test_bf16_weights_and_autocast():
    torch.manual_seed(0)
    experts = ExpertFFN(32, 64, num_experts=4)
    sizes = torch.tensor([40, 0, 7, 33])
    x = torch.randn(80, 32)
    y_ref = expert_reference(experts, x, sizes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = experts(x, sizes)
    assert y_auto.dtype == torch.bfloat16
    assert_close("y (autocast)", y_ref, y_auto, atol=5e-2, rtol=5e-2)
    bf16 = ExpertFFN(32, 64, num_experts=4).to(torch.bfloat16)
    bf16.load_state_dict(experts.state_dict())
    x16 = x.to(torch.bfloat16).requires_grad_()
    y16 = bf16(x16, sizes)
    assert y16.dtype == torch.bfloat16
    assert_close("y (bf16)", expert_reference(bf16, x16, sizes), y16, **TOLERANCES[torch.bfloat16])
    y16.float().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(bf16.w13.grad.float()).all()


def test_init_like_nn_linear():
    torch.manual_seed(0)
    experts = ExpertFFN(64, 256, num_experts=8)
    assert experts.w13.abs().max() <= 64 ** -0.5 and experts.w2.abs().max() <= 256 ** -0.5
    assert experts.w13.abs().max() > 0.9 * 64 ** -0.5  # uniform over the whole range, not a tiny init


@pytest.mark.parametrize("k", [1, 2, 3])
def test_identical_experts_with_normalised_gates_equal_dense_swiglu(k):
    torch.manual_seed(0)
    experts, dense = ExpertFFN(16, 24, num_experts=5), SwiGLU(16, 24)
    with torch.no_grad():
        experts.w13.copy_(experts.w13[0].expand_as(experts.w13))
        experts.w2.copy_(experts.w2[0].expand_as(experts.w2))
        dense.w13.weight.copy_(experts.w13[:1])
        dense.w2.weight.copy_(experts.w2[:1])
    x = torch.randn(21, 16, requires_grad=True)
    gates, expert_ids = torch.randn(21, 5).topk(k, dim=-1)
    gates = gates.softmax(-1)  # each token's gates sum to 1
    y = dispatch_combine(x, expert_ids if k > 1 else expert_ids[:, 0], gates if k > 1 else gates[:, 0], experts)
    y_dense = dense(x)
    assert_close("y", y_dense, y, **TOLERANCES[torch.float32])
    g = torch.randn_like(y)
    assert_close("dx", torch.autograd.grad(y_dense, x, g)[0], torch.autograd.grad(y, x, g)[0],
                 **TOLERANCES[torch.float32])


def test_dispatch_combine_matches_per_token_reference():
    torch.manual_seed(0)
    experts = ExpertFFN(8, 12, num_experts=4)
    x = torch.randn(9, 8, requires_grad=True)
    expert_ids = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    expert_ids[:4] = torch.tensor([3, 1])  # expert 0 or 2 may end up empty; experts 1 and 3 are busy
    gates = torch.rand(9, 2, requires_grad=True)
    y = dispatch_combine(x, expert_ids, gates, experts)
    y_ref = token_reference(experts, x, expert_ids, gates)
    assert_close("y", y_ref, y, **TOLERANCES[torch.float32])
    g = torch.randn_like(y)
    params = [x, gates, experts.w13, experts.w2]
    for name, r, o in zip(["dx", "dgates", "dw13", "dw2"], torch.autograd.grad(y_ref, params, g),
                          torch.autograd.grad(y, params, g)):
        assert_close(name, r, o, **TOLERANCES[torch.float32])


def test_run_experts_leaves_unrouted_tokens_zero():
    torch.manual_seed(0)
    experts = ExpertFFN(8, 12, num_experts=3)
    x = torch.randn(6, 8)
    token_index = torch.tensor([0, 4, 4, 0])  # expert 0: tokens 0, 4; expert 1: none; expert 2: tokens 4, 0
    gates = torch.tensor([0.5, 1.0, 2.0, 0.25])
    y = run_experts(x, token_index, gates, torch.tensor([2, 0, 2]), experts)
    assert torch.count_nonzero(y[[1, 2, 3, 5]]) == 0
    e0 = expert_reference(experts, x[[0, 4]], torch.tensor([2, 0, 0]))
    e2 = expert_reference(experts, x[[4, 0]], torch.tensor([0, 0, 2]))
    assert_close("token 0", 0.5 * e0[0] + 0.25 * e2[1], y[0], **TOLERANCES[torch.float32])
    assert_close("token 4", 1.0 * e0[1] + 2.0 * e2[0], y[4], **TOLERANCES[torch.float32])


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_experts >= 1"):
        ExpertFFN(8, 16, num_experts=0)
    experts = ExpertFFN(8, 16, num_experts=3)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="shape of expert_ids"):
        dispatch_combine(x, torch.zeros(4, 2, dtype=torch.long), torch.ones(4), experts)
    with pytest.raises(ValueError, match="T = 4 tokens"):
        dispatch_combine(x, torch.zeros(5, dtype=torch.long), torch.ones(5), experts)
    with pytest.raises(ValueError, match="one per expert"):
        run_experts(x, torch.zeros(2, dtype=torch.long), torch.ones(2), torch.tensor([2, 0]), experts)
    with pytest.raises((ValueError, RuntimeError), match="group_ids"):
        dispatch_combine(x, torch.tensor([0, 1, 3, 0]), torch.ones(4), experts)


def test_dispatch_combine_under_torch_compile():
    torch.manual_seed(0)
    experts = ExpertFFN(16, 32, num_experts=4)
    x, gates = torch.randn(10, 16), torch.rand(10, 2)
    expert_ids = torch.randint(0, 4, (10, 2))
    compiled = torch.compile(lambda x, ids, g: dispatch_combine(x, ids, g, experts), fullgraph=True)
    y = compiled(x, expert_ids, gates)
    assert_close("y", dispatch_combine(x, expert_ids, gates, experts), y, **TOLERANCES[torch.float32])
