"""Tests of the permutation ops (sort_by_group, gather_rows, scatter_rows): reference first, kernel second,
on the CPU and, when there is one, the GPU (inputs are made on the CPU, the references run there).

Legend: T tokens, k routing slots per token, E groups / experts, R rows, D features.
"""
import pytest
import torch

import momoe  # noqa: F401  (loads the extension in kernel mode)
from momoe.ops.backend import extension_available, use_backend
from momoe.ops.permute import gather_rows, naive, scatter_rows, sort_by_group
from tests.utils import DEVICES, TOLERANCES, assert_close, case_id, device_assert_outputs

pytestmark = pytest.mark.skipif(not extension_available(), reason="momoe._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ID_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
EXACT = dict(atol=0.0, rtol=0.0)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def randint(high, shape, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(high, 1), shape, generator=g).to(dtype)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def leaf(t, device):
    """A copy of t on `device` that is a leaf of autograd (requiring grad when t does)."""
    return t.detach().to(device).requires_grad_(t.requires_grad)


def strided_rows(t):
    """The same values as t with a row stride larger than its row (a column slice of a wider tensor)."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype, device=t.device)
    wide[:, 1 : 1 + t.shape[1]] = t
    return wide[:, 1 : 1 + t.shape[1]].requires_grad_(t.requires_grad)


def transposed(t):
    """The same values as t stored column-major (stride(1) != 1)."""
    return t.detach().t().contiguous().t().requires_grad_(t.requires_grad)


def every_other(ids):
    """The same values as a 1-D id tensor, as a non-contiguous view."""
    return torch.stack([ids, ids], dim=1)[:, 0]


# --------------------------------------------------------------------------------------------- sort_by_group


def stable_sort_oracle(group_ids, num_groups):
    flat = group_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    return order, torch.bincount(flat, minlength=num_groups)


SORT_CASES = [(T, k, E) for T, k, E in [(17, 1, 4), (33, 2, 8), (9, 4, 3), (50, 2, 64), (0, 2, 4), (5, 1, 0)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
@pytest.mark.parametrize("T,k,E", SORT_CASES, ids=[case_id(T=T, k=k, E=E) for T, k, E in SORT_CASES])
def test_sort_by_group(T, k, E, id_dtype, device):
    if E == 0 and T > 0:
        T = 0
    shape = (T,) if k == 1 else (T, k)
    group_ids = randint(E, shape, id_dtype, seed=T + k)
    ref_order, ref_sizes = naive.sort_by_group(group_ids, E)
    oracle_order, oracle_sizes = stable_sort_oracle(group_ids, E)
    assert torch.equal(ref_order, oracle_order) and torch.equal(ref_sizes, oracle_sizes)
    order, sizes = torch.ops.momoe.sort_by_group(group_ids.to(device), E)
    assert order.dtype == torch.int64 and sizes.dtype == torch.int64
    assert order.shape == (T * k,) and sizes.shape == (E,)
    assert order.device.type == sizes.device.type == device
    assert torch.equal(order.cpu(), ref_order)
    assert torch.equal(sizes.cpu(), ref_sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_sort_by_group_is_stable(device):
    group_ids = torch.tensor([2, 0, 2, 0, 1, 2, 0], device=device)
    order, sizes = sort_by_group(group_ids, 4)
    assert order.tolist() == [1, 3, 6, 4, 0, 2, 5]
    assert sizes.tolist() == [3, 1, 3, 0]
    # Top-k: slots of one token are adjacent in the flattening, ties keep (token, slot) order.
    order, sizes = sort_by_group(torch.tensor([[1, 0], [1, 2], [0, 1]], dtype=torch.int8, device=device), 4)
    assert order.tolist() == [1, 4, 0, 2, 5, 3]
    assert sizes.tolist() == [2, 3, 1, 0]


@pytest.mark.parametrize("E", [3, 1000], ids=lambda E: f"E{E}")
def test_sort_by_group_large_is_deterministic(E):
    """Large enough for several parallel chunks; identical to a stable sort whatever the thread count."""
    group_ids = randint(E, (40000, 2), torch.int32, seed=E)
    oracle_order, oracle_sizes = stable_sort_oracle(group_ids, E)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            order, sizes = torch.ops.momoe.sort_by_group(group_ids, E)
            assert torch.equal(order, oracle_order) and torch.equal(sizes, oracle_sizes)
    finally:
        torch.set_num_threads(threads)


@requires_cuda
@pytest.mark.parametrize("E", [1, 3, 1000, 1024, 1025, 5000], ids=lambda E: f"E{E}")
def test_sort_by_group_cuda_large(E):
    """Many blocks of the counting sort (E <= 1024) and the radix sort beyond; a stable sort each time."""
    group_ids = randint(E, (40000, 2), torch.int32, seed=E)
    oracle_order, oracle_sizes = stable_sort_oracle(group_ids, E)
    for _ in range(2):
        order, sizes = torch.ops.momoe.sort_by_group(group_ids.cuda(), E)
        assert torch.equal(order.cpu(), oracle_order) and torch.equal(sizes.cpu(), oracle_sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_sort_by_group_non_contiguous(device):
    group_ids = randint(5, (20, 3), torch.int16, seed=1).to(device).t().contiguous().t()
    assert not group_ids.is_contiguous()
    order, sizes = sort_by_group(group_ids, 5)
    ref_order, ref_sizes = naive.sort_by_group(group_ids.cpu(), 5)
    assert torch.equal(order.cpu(), ref_order) and torch.equal(sizes.cpu(), ref_sizes)


# --------------------------------------------------------------------------------------------- gather_rows

GATHER_CASES = [(T, D, R) for T, D, R in [(13, 1, 20), (13, 3, 13), (40, 37, 80), (8, 64, 5), (0, 4, 0), (6, 5, 0)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("T,D,R", GATHER_CASES, ids=[case_id(T=T, D=D, R=R) for T, D, R in GATHER_CASES])
def test_gather_rows(T, D, R, dtype, device):
    x = randn(T, D, dtype=dtype, seed=1).requires_grad_()
    index = randint(T, (R,), seed=2)
    grad = randn(R, D, dtype=dtype, seed=3)
    ref = naive.gather_rows(x, index)
    (ref_dx,) = torch.autograd.grad(ref, x, grad) if R > 0 else (torch.zeros_like(x),)
    x = leaf(x, device)
    out = gather_rows(x, index.to(device))
    assert out.dtype == dtype and out.device.type == device
    assert_close("out", ref, out, **EXACT)
    (dx,) = torch.autograd.grad(out, x, grad.to(device))
    assert_close("dx", ref_dx, dx, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
def test_gather_rows_id_dtypes(id_dtype, device):
    x = randn(30, 7, seed=4)
    index = randint(30, (50,), id_dtype, seed=5)
    assert torch.equal(gather_rows(x.to(device), index.to(device)).cpu(), x[index.long()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided_rows", "transposed"])
def test_gather_rows_non_contiguous(layout, device):
    x0 = randn(12, 9, seed=6)
    x = (strided_rows if layout == "strided_rows" else transposed)(x0.clone().to(device).requires_grad_())
    assert not x.is_contiguous()
    index = every_other(randint(12, (25,), torch.int32, seed=7).to(device))
    assert not index.is_contiguous()
    grad = randn(25, 9, seed=8)
    out = gather_rows(x, index)
    assert_close("out", x0[index.long().cpu()], out, **EXACT)
    (dx,) = torch.autograd.grad(out, x, grad.to(device))
    ref_dx = torch.zeros(12, 9).index_add_(0, index.long().cpu(), grad)
    assert_close("dx", ref_dx, dx, **TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------- scatter_rows

SCATTER_CASES = [
    (N, D, R) for N, D, R in [(10, 1, 25), (10, 3, 10), (7, 37, 30), (50, 16, 12), (4, 8, 0), (0, 5, 0)]
]
WEIGHTS = ["none", "same", "fp32"]


def make_weight(kind, R, dtype, seed=9):
    if kind == "none":
        return None
    return randn(R, dtype=dtype if kind == "same" else torch.float32, seed=seed).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("N,D,R", SCATTER_CASES, ids=[case_id(N=N, D=D, R=R) for N, D, R in SCATTER_CASES])
def test_scatter_rows(N, D, R, dtype, weight_kind, device):
    y = randn(R, D, dtype=dtype, seed=10).requires_grad_()
    index = randint(N, (R,), seed=11)
    weight = make_weight(weight_kind, R, dtype)
    grad = randn(N, D, dtype=dtype, seed=12)
    inputs = [y] + ([weight] if weight is not None else [])

    ref = naive.scatter_rows(y, index, N, weight=weight)
    ref_grads = torch.autograd.grad(ref, inputs, grad, allow_unused=True) if N * D > 0 and R > 0 else None
    inputs = [leaf(t, device) for t in inputs]
    out = scatter_rows(inputs[0], index.to(device), N, weight=inputs[1] if weight is not None else None)
    assert out.dtype == dtype and out.shape == (N, D) and out.device.type == device
    assert_close("out", ref, out, **TOLERANCES[dtype])
    grads = torch.autograd.grad(out, inputs, grad.to(device), allow_unused=True)
    if ref_grads is None:
        ref_grads = [torch.zeros_like(t) for t in inputs]
    assert_close("dy", ref_grads[0], grads[0], **TOLERANCES[dtype])
    if weight is not None:
        assert grads[1].dtype == weight.dtype
        tol = TOLERANCES[dtype]
        assert_close("dweight", ref_grads[1], grads[1], atol=tol["atol"] * 4, rtol=tol["rtol"] * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_rows_rows_without_contributions_are_zero(device):
    y = torch.ones(3, 4, device=device)
    weight = torch.tensor([1.0, 2.0, 3.0], device=device)
    out = scatter_rows(y, torch.tensor([5, 1, 5], device=device), 8, weight=weight)
    expected = torch.zeros(8, 4)
    expected[1], expected[5] = 2.0, 4.0
    assert torch.equal(out.cpu(), expected)


def test_scatter_rows_is_deterministic():
    y = randn(3000, 16, seed=13)
    index = randint(50, (3000,), seed=14)
    weight = randn(3000, seed=15)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(scatter_rows(y, index, 50, weight=weight))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
def test_scatter_rows_cuda_is_deterministic(dtype):
    """Bitwise the same result on every run: each output row is summed by one warp in a fixed order."""
    y = randn(20000, 64, dtype=dtype, seed=13).cuda()
    index = randint(3000, (20000,), seed=14).cuda()  # 3000 rows: the radix-sort CSR
    weight = randn(20000, seed=15).cuda()
    outs = [scatter_rows(y, index, 3000, weight=weight) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    ref = torch.zeros(3000, 64).index_add_(0, index.long().cpu(), weight.cpu()[:, None] * y.float().cpu())
    assert_close("out", ref, outs[0], **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
def test_scatter_rows_id_dtypes(id_dtype, device):
    y = randn(40, 5, seed=16)
    index = randint(20, (40,), id_dtype, seed=17)
    ref = torch.zeros(20, 5).index_add_(0, index.long(), y)
    assert_close("out", ref, scatter_rows(y.to(device), index.to(device), 20), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided_rows", "transposed"])
def test_scatter_rows_non_contiguous(layout, device):
    y0 = randn(30, 6, seed=18)
    y = (strided_rows if layout == "strided_rows" else transposed)(y0.clone().to(device).requires_grad_())
    index = every_other(randint(9, (30,), torch.int16, seed=19).to(device))
    weight = every_other(randn(30, seed=20).to(device)).detach().requires_grad_()
    assert not y.is_contiguous() and not index.is_contiguous()
    grad = randn(9, 6, seed=21).to(device).t().contiguous().t()  # a non-contiguous cotangent too
    index_cpu, weight_cpu, grad_cpu = index.cpu(), weight.detach().cpu(), grad.cpu()
    ref = naive.scatter_rows(y0.clone().requires_grad_(), index_cpu, 9, weight=weight_cpu.clone().requires_grad_())
    out = scatter_rows(y, index, 9, weight=weight)
    assert_close("out", ref, out, **TOLERANCES[torch.float32])
    dy, dw = torch.autograd.grad(out, [y, weight], grad)
    ref_dy = weight_cpu[:, None] * grad_cpu[index_cpu.long()]
    ref_dw = (grad_cpu[index_cpu.long()] * y0).sum(-1)
    assert_close("dy", ref_dy, dy, **TOLERANCES[torch.float32])
    assert_close("dweight", ref_dw, dw, **TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------- dispatch / combine


def moe(x, logits, w_E, k, ops):
    """Top-k MoE dispatch -> per-expert row op -> combine, through `ops` (the public module or naive)."""
    T, E = logits.shape
    gates_Tk, experts_Tk = logits.softmax(-1).topk(k, dim=-1)
    order, sizes = ops.sort_by_group(experts_Tk, E)
    token = order // k
    xs = ops.gather_rows(x, token)
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=sizes.device), sizes, output_size=T * k)
    ys = torch.tanh(xs * w_E[expert_of_row][:, None].to(xs.dtype))
    return ops.scatter_rows(ys, token, T, weight=gates_Tk.flatten()[order].to(ys.dtype))


MOE_CASES = [(T, E, k, D) for T, E, k, D in [(24, 4, 1, 8), (24, 4, 2, 37), (16, 8, 4, 3), (10, 16, 2, 5)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("T,E,k,D", MOE_CASES, ids=[case_id(T=T, E=E, k=k, D=D) for T, E, k, D in MOE_CASES])
def test_dispatch_combine(T, E, k, D, dtype, device):
    x = randn(T, D, dtype=dtype, seed=22).requires_grad_()
    logits = randn(T, E, seed=23).requires_grad_()
    w_E = randn(E, seed=24).requires_grad_()
    grad = randn(T, D, dtype=dtype, seed=25)
    ref = moe(x, logits, w_E, k, naive)
    ref_grads = torch.autograd.grad(ref, [x, logits, w_E], grad)
    inputs = [leaf(t, device) for t in (x, logits, w_E)]
    out = moe(*inputs, k, momoe.ops.permute)
    assert_close("out", ref, out, **TOLERANCES[dtype])
    grads = torch.autograd.grad(out, inputs, grad.to(device))
    tol = TOLERANCES[dtype]
    for name, r, o in zip(["dx", "dlogits", "dw"], ref_grads, grads):
        assert_close(name, r, o, atol=tol["atol"] * 4, rtol=tol["rtol"] * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_parity(device):
    x = randn(20, 6, seed=26).to(device)
    logits = randn(20, 5, seed=27).to(device)
    w_E = randn(5, seed=28).to(device)
    group_ids = randint(5, (20, 2), torch.uint8).to(device)
    out = moe(x, logits, w_E, 2, momoe.ops.permute)
    with use_backend("reference"):
        ref = moe(x, logits, w_E, 2, momoe.ops.permute)
        ref_sort = sort_by_group(group_ids, 5)
    assert_close("out", ref, out, **TOLERANCES[torch.float32])
    kernel_sort = sort_by_group(group_ids, 5)
    assert all(torch.equal(a, b) for a, b in zip(ref_sort, kernel_sort))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    T, E, k, D = 12, 4, 2, 8
    x = randn(T, D, seed=29).to(device).requires_grad_()
    logits = randn(T, E, seed=30).to(device).requires_grad_()
    w_DD = randn(D, D, seed=31).to(device).requires_grad_()

    def pipeline(x, logits, w_DD):
        gates_Tk, experts_Tk = logits.softmax(-1).topk(k, dim=-1)
        order, sizes = sort_by_group(experts_Tk, E)
        token = order // k
        xs = gather_rows(x, token)
        ys = torch.nn.functional.silu(xs @ w_DD)
        return scatter_rows(ys, token, x.shape[0], weight=gates_Tk.flatten()[order])

    grad = randn(T, D, seed=32).to(device)
    ref = pipeline(x, logits, w_DD)
    ref_grads = torch.autograd.grad(ref, [x, logits, w_DD], grad)
    out = torch.compile(pipeline, fullgraph=True)(x, logits, w_DD)
    grads = torch.autograd.grad(out, [x, logits, w_DD], grad)
    assert_close("out", ref, out, **TOLERANCES[torch.float32])
    for name, r, o in zip(["dx", "dlogits", "dw"], ref_grads, grads):
        assert_close(name, r, o, **TOLERANCES[torch.float32])
    torch._dynamo.reset()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
def test_cuda_no_host_sync(dtype):
    """Dispatch and combine, forward and backward, never wait for the GPU (ids are checked on the device)."""
    T, E, k = 64, 8, 2
    x = randn(T, 32, dtype=dtype, seed=33).cuda().requires_grad_()
    weight = randn(T * k, seed=34).cuda().requires_grad_()
    expert_ids = randint(E, (T, k), seed=35).cuda()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        order, sizes = sort_by_group(expert_ids, E)
        token = order // k
        out = scatter_rows(torch.tanh(gather_rows(x, token)), token, T, weight=weight)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    ref = naive.scatter_rows(torch.tanh(x.detach().cpu()[token.cpu()]), token.cpu(), T, weight=weight.detach().cpu())
    assert_close("out", ref, out, **TOLERANCES[dtype])
    assert x.grad is not None and weight.grad is not None


# --------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sort_by_group(device):
    torch.library.opcheck(torch.ops.momoe.sort_by_group.default, (randint(4, (9, 2), torch.int32).to(device), 4))
    torch.library.opcheck(torch.ops.momoe.sort_by_group.default, (randint(3, (7,)).to(device), 5))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gather_rows(device):
    x = randn(6, 5).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.momoe.gather_rows.default, (x, randint(6, (9,), torch.int32).to(device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_weight", [False, True], ids=["no_weight", "weight"])
def test_opcheck_scatter_rows(with_weight, device):
    y = randn(9, 5).to(device).requires_grad_()
    weight = randn(9, seed=1).to(device).requires_grad_() if with_weight else None
    torch.library.opcheck(torch.ops.momoe.scatter_rows.default, (y, randint(4, (9,)).to(device), 6, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_weight", [False, True], ids=["no_weight", "weight"])
def test_opcheck_scatter_rows_backward(with_weight, device):
    weight = randn(9, seed=1).to(device) if with_weight else None
    args = (randn(6, 5, seed=2).to(device), randn(9, 5, seed=3).to(device), randint(6, (9,)).to(device), weight)
    torch.library.opcheck(torch.ops.momoe.scatter_rows_backward.default, args)


# --------------------------------------------------------------------------------------------- bad inputs

X, Y = randn(5, 3), randn(4, 3)
IDX = torch.tensor([0, 1, 2, 3])
OPS = {"sort_by_group": sort_by_group, "gather_rows": gather_rows, "scatter_rows": scatter_rows}

# (name, op, arguments, match): the op is called as torch.ops.momoe.<op>(*arguments) and through its public
# function, reference and kernel backends.
BAD_INPUTS = [
    ("sort-negative-id", "sort_by_group", (torch.tensor([0, -1, 2]), 3),
     r"group_ids must be in \[0, num_groups=3\).*got -1"),
    ("sort-too-large-id", "sort_by_group", (torch.tensor([[0, 1], [3, 2]], dtype=torch.int8), 3),
     r"group_ids must be in \[0, num_groups=3\).*got 3"),
    ("sort-rank", "sort_by_group", (torch.zeros(2, 2, 2, dtype=torch.long), 3),
     r"group_ids must have shape \(T,\) or \(T, k\)"),
    ("sort-float-ids", "sort_by_group", (torch.zeros(3), 3), r"group_ids must be an integer tensor"),
    ("sort-negative-groups", "sort_by_group", (torch.zeros(0, dtype=torch.long), -1), r"num_groups must be >= 0"),
    ("gather-negative-id", "gather_rows", (X, torch.tensor([0, -2])), r"index must be in \[0, 5\).*got -2"),
    ("gather-too-large-id", "gather_rows", (X, torch.tensor([5], dtype=torch.uint8)),
     r"index must be in \[0, 5\).*got 5"),
    ("gather-x-rank", "gather_rows", (X.flatten(), IDX), r"x must have 2 dimensions"),
    ("gather-index-rank", "gather_rows", (X, IDX[None]), r"index must have 1 dimensions"),
    ("gather-float-index", "gather_rows", (X, IDX.float()), r"index must be an integer tensor"),
    ("gather-int-x", "gather_rows", (X.long(), IDX), r"x must be float32, bfloat16 or float16"),
    ("gather-device", "gather_rows", (X, IDX.to("meta")), r"x and index must be on the same device"),
    ("scatter-negative-id", "scatter_rows", (Y, torch.tensor([0, 1, -1, 2]), 5),
     r"index must be in \[0, (num_rows=)?5\).*got -1"),
    ("scatter-too-large-id", "scatter_rows", (Y, torch.tensor([0, 1, 7, 2]), 5),
     r"index must be in \[0, (num_rows=)?5\).*got 7"),
    ("scatter-y-rank", "scatter_rows", (Y.flatten(), IDX, 5), r"y must have 2 dimensions"),
    ("scatter-index-rank", "scatter_rows", (Y, IDX[:, None], 5), r"index must have 1 dimensions"),
    ("scatter-index-length", "scatter_rows", (Y, IDX[:3], 5), r"index must have one entry per row of y"),
    ("scatter-float-index", "scatter_rows", (Y, IDX.double(), 5), r"index must be an integer tensor"),
    ("scatter-negative-rows", "scatter_rows", (Y, IDX, -1), r"num_rows must be >= 0"),
    ("scatter-weight-shape", "scatter_rows", (Y, IDX, 5, torch.ones(3)), r"weight must have shape \(4,\)"),
    ("scatter-weight-rank", "scatter_rows", (Y, IDX, 5, torch.ones(4, 1)), r"weight must have"),
    ("scatter-weight-dtype", "scatter_rows", (Y, IDX, 5, torch.ones(4, dtype=torch.float16)),
     r"weight must be .*or float32"),
    ("scatter-double-y", "scatter_rows", (Y.double(), IDX, 5), r"y must be float32, bfloat16 or float16"),
]
BAD_IDS = [case[0] for case in BAD_INPUTS]

# Ids out of range: the CUDA kernels check them on the device (test_cuda_ids_are_checked_on_the_device).
CHECKED_ON_THE_DEVICE = {"sort-negative-id", "sort-too-large-id", "gather-negative-id", "gather-too-large-id",
                         "scatter-negative-id", "scatter-too-large-id", "too-large-id"}


def on_device(args, device, name):
    """The arguments of a bad-input case on `device` (meta tensors stay meta)."""
    if device == "cuda" and name in CHECKED_ON_THE_DEVICE:
        pytest.skip("the CUDA kernels check ids on the device: see test_cuda_ids_are_checked_on_the_device")
    return tuple(a.to(device) if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,op,args,match", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_op(name, op, args, match, device):
    args = on_device(args, device, name)
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.momoe, op)(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,op,args,match", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_public(name, op, args, match, device):
    args = on_device(args, device, name)
    with pytest.raises((RuntimeError, ValueError), match=match):
        OPS[op](*args)


@pytest.mark.parametrize("name,op,args,match", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_reference(name, op, args, match):
    with use_backend("reference"), pytest.raises((RuntimeError, ValueError), match=match):
        OPS[op](*args)


BAD_BACKWARD = [
    ("D-mismatch", (randn(5, 4), Y, IDX, None), r"grad_out must have 3 columns"),
    ("dtype-mismatch", (randn(5, 3, dtype=torch.float16), Y, IDX, None), r"grad_out must have y's dtype"),
    ("too-large-id", (randn(3, 3), Y, IDX, None), r"index must be in \[0, 3\).*got 3"),
    ("weight-shape", (randn(5, 3), Y, IDX, torch.ones(5)), r"weight must have shape \(4,\)"),
    ("index-length", (randn(5, 3), Y, IDX[:2], None), r"index must have one entry per row of y"),
    ("float-index", (randn(5, 3), Y, IDX.float(), None), r"index must be an integer tensor"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,args,match", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_bad_input_scatter_rows_backward(name, args, match, device):
    args = on_device(args, device, name)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.momoe.scatter_rows_backward(*args)


@requires_cuda
def test_cuda_kernels_are_registered():
    """A GPU build registers the CUDA kernels (a CPU-only momoe._C would otherwise fall through)."""
    for op in ("sort_by_group", "gather_rows", "scatter_rows", "scatter_rows_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"momoe::{op}", "CUDA"), op


@requires_cuda
def test_cuda_ids_are_checked_on_the_device():
    """An id out of range fails a device-side assertion naming the op and the argument, and the offending
    id is printed (each case in a fresh process: the assertion leaves the CUDA context unusable)."""
    program = """
import torch
import momoe.ops
x, ones = torch.randn(5, 8, device="cuda"), torch.ones(5, device="cuda")
ids = torch.tensor({ids}, device="cuda")
{call}
torch.cuda.synchronize()
"""
    cases = {  # name: (ids, call, message, printed id)
        "sort": ([0, 3, 1, 2, 0], "torch.ops.momoe.sort_by_group(ids, 3)",
                 "sort_by_group: group_ids must be in [0, num_groups)", "id 3 at position 1 is outside [0, 3)"),
        "sort-radix": ([0, -1, 4], "torch.ops.momoe.sort_by_group(ids, 2000)",
                       "sort_by_group: group_ids must be in [0, num_groups)", "id -1 at position 1"),
        "gather": ([0, 5], "torch.ops.momoe.gather_rows(x, ids)", "gather_rows: index must be in [0, rows of x)",
                   "id 5 at position 1 is outside [0, 5)"),
        "scatter": ([0, 1, 2, 3, 7], "torch.ops.momoe.scatter_rows(x, ids, 4, None)",
                    "scatter_rows: index must be in [0, num_rows)", "id 7 at position 4 is outside [0, 4)"),
        "scatter-backward": ([0, 1, 2, 3, 4], "torch.ops.momoe.scatter_rows_backward(x[:3], x, ids, None)",
                             "scatter_rows_backward: index must be in [0, rows of grad_out)", "id 3 at position 3"),
        "scatter-backward-weighted": ([0, -1, 2, 0, 1], "torch.ops.momoe.scatter_rows_backward(x[:3], x, ids, ones)",
                                      "scatter_rows_backward: index must be in [0, rows of grad_out)",
                                      "id -1 at position 1"),
    }
    programs = {name: program.format(ids=ids, call=call) for name, (ids, call, _, _) in cases.items()}
    outputs = device_assert_outputs(programs)
    for name, (_, _, message, printed) in cases.items():
        assert f"momoe: {message}" in outputs[name], outputs[name][-3000:]
        assert printed in outputs[name], outputs[name][-3000:]
