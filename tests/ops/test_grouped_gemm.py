"""Grouped GEMM: kernel vs the fp32 reference (forward, dx, dw), layouts, empty groups, errors, on the
CPU and, when there is one, the GPU (the reference always runs on the CPU).

Shape legend: T tokens (rows of x), K input features, N output features, G groups.
"""
import pytest
import torch

from momoe.ops.backend import extension_available, use_backend
from momoe.ops.grouped_gemm import grouped_gemm, naive
from tests.utils import DEVICES, TOLERANCES, assert_close, case_id, device_assert_outputs

pytestmark = pytest.mark.skipif(not extension_available(), reason="momoe._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ERRORS = (RuntimeError, ValueError)

# (T, K, N, group sizes): odd shapes, empty groups first / middle / last / all but one, G=1, T=0,
# K=0, and splits large enough for the GEMMs to run one after another with all threads.
SHAPES = [
    (37, 19, 23, [5, 11, 0, 21]),
    (37, 19, 23, [0, 20, 17]),
    (37, 19, 23, [12, 0, 25]),
    (37, 19, 23, [30, 7, 0]),
    (37, 19, 23, [0, 0, 37, 0]),
    (37, 19, 23, [37]),
    (0, 19, 23, [0, 0, 0]),
    (9, 0, 7, [4, 0, 5]),
    (17, 8, 5, [1, 2, 0, 3, 1, 4, 0, 6]),
    (300, 512, 160, [200, 0, 100]),
    # bf16/fp16 windows: rounded up into the next group's rows, a batched run of equal sizes (a
    # multiple of the 32-row quantum), a tail group covered by two windows; and many small groups
    # spread over threads.
    (300, 512, 640, [45, 0, 64, 64, 70, 57]),
    # a run of equal sizes off the quantum: looped, each window spilling into the next group
    (200, 64, 96, [45, 45, 45, 65]),
    (150, 8, 5, [40, 0, 50, 33, 27]),
    # CUDA: several 128-row tiles per group, row lengths that need no padding, an empty group.
    (700, 256, 384, [300, 0, 129, 271]),
]


def make_w(G, K, N, dtype, trans_w):
    shape = (G, N, K) if trans_w else (G, K, N)
    return torch.randn(shape, dtype=torch.float32).div_(max(K, 1) ** 0.5).to(dtype)


def forward_backward(fn, x, w, group_sizes, trans_w, dy):
    """y, dx, dw of fn on fresh leaves (so layouts of x and w are kept)."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = fn(x, w, group_sizes, trans_w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def check_against_reference(x, w, group_sizes, trans_w, seed=0, device="cpu", sizes_device=None):
    """The op on `device` (group_sizes on `sizes_device`, default `device`) against the reference on
    the CPU, forward and both gradients."""
    dtype = x.dtype
    torch.manual_seed(seed)
    n = w.shape[1] if trans_w else w.shape[2]
    dy = torch.randn(x.shape[0], n).to(dtype)
    # Reference first: fp32 math on the same (rounded) inputs and cotangent.
    ref = forward_backward(naive.grouped_gemm, x.float().cpu(), w.float().cpu(), group_sizes.cpu(), trans_w, dy.float())
    sizes = group_sizes.to(sizes_device or device)
    out = forward_backward(torch.ops.momoe.grouped_gemm, x.to(device), w.to(device), sizes, trans_w, dy.to(device))
    for name, r, o in zip(("y", "dx", "dw"), ref, out):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype} != {dtype}"
        assert o.device.type == device, f"{name}: on {o.device}, not {device}"
        assert_close(name, r, o, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize(
    "T,K,N,sizes", SHAPES, ids=[case_id(T=t, K=k, N=n, sizes="_".join(map(str, s))) for t, k, n, s in SHAPES]
)
def test_grouped_gemm_matches_reference(T, K, N, sizes, dtype, trans_w, device):
    torch.manual_seed(T + K + N)
    x = torch.randn(T, K).to(dtype)
    w = make_w(len(sizes), K, N, dtype, trans_w)
    check_against_reference(x, w, torch.tensor(sizes), trans_w, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gs_dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_group_sizes_any_integer_dtype(gs_dtype, device):
    torch.manual_seed(1)
    x, w = torch.randn(37, 19), make_w(4, 19, 23, torch.float32, False)
    check_against_reference(x, w, torch.tensor([5, 11, 0, 21], dtype=gs_dtype), False, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("device", DEVICES)
def test_group_sizes_on_the_host(device, dtype):
    """group_sizes may stay on the CPU while x and w are on the device (checked there, then copied)."""
    torch.manual_seed(8)
    x, w = torch.randn(300, 64).to(dtype), make_w(4, 64, 48, dtype, True)
    check_against_reference(x, w, torch.tensor([100, 0, 150, 50]), True, device=device, sizes_device="cpu")


def non_contiguous(t, layout):
    """The same values as `t` in a layout that is not contiguous (on t's device)."""
    if layout == "transposed":  # the last two dims swapped in memory: a GEMM takes it as it is
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert layout == "strided"  # every other column: a GEMM cannot take these strides directly
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(layout, dtype, trans_w, device):
    torch.manual_seed(2)
    x = non_contiguous(torch.randn(37, 19).to(dtype).to(device), layout)
    w = non_contiguous(make_w(4, 19, 23, dtype, trans_w).to(device), layout)
    gs = torch.tensor([5, 11, 0, 21], device=device)
    assert not x.is_contiguous() and not w.is_contiguous()
    check_against_reference(x, w, gs, trans_w, device=device)
    # A non-contiguous cotangent (e.g. from a transpose downstream) goes through dx and dw too.
    dy = non_contiguous(torch.randn(37, 23).to(dtype).to(device), layout)
    ref = forward_backward(naive.grouped_gemm, x.float().cpu(), w.float().cpu(), gs.cpu(), trans_w, dy.float().cpu())
    out = forward_backward(grouped_gemm, x, w, gs, trans_w, dy)
    for name, r, o in zip(("y", "dx", "dw"), ref, out):
        assert_close(name, r, o, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: case_id(dtype=d))
def test_fp32_accumulation(dtype, device):
    """All-positive products summed over a long K (forward) and over many rows (dw): an
    accumulator in the input dtype would drift by far more than the one final rounding."""
    torch.manual_seed(3)
    one_rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    x = torch.rand(8, 16384).to(dtype)
    w = torch.rand(2, 16384, 8).to(dtype)
    gs = torch.tensor([3, 5])
    ref = naive.grouped_gemm(x.float(), w.float(), gs)
    y = torch.ops.momoe.grouped_gemm(x.to(device), w.to(device), gs.to(device)).cpu()
    assert ((y.float() - ref).abs() / ref).max().item() <= 1.01 * one_rounding
    x, dy = torch.rand(16384, 8).to(dtype), torch.rand(16384, 4).to(dtype)
    gs = torch.tensor([16000, 384])
    ref = naive.grouped_gemm_dw(x.float(), dy.float(), gs)
    dw = torch.ops.momoe.grouped_gemm_dw(x.to(device), dy.to(device), gs.to(device)).cpu()
    assert ((dw.float() - ref).abs() / ref).max().item() <= 1.01 * one_rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
def test_grouped_gemm_dw_matches_reference(trans_w, device):
    torch.manual_seed(4)
    x, dy, gs = torch.randn(37, 19), torch.randn(37, 23), torch.tensor([0, 12, 0, 25, 0])
    ref = naive.grouped_gemm_dw(x, dy, gs, trans_w)
    out = torch.ops.momoe.grouped_gemm_dw(x.to(device), dy.to(device), gs.to(device), trans_w).cpu()
    assert out.shape == ((5, 23, 19) if trans_w else (5, 19, 23))
    assert_close("dw", ref, out, **TOLERANCES[torch.float32])
    assert bool((out[[0, 2, 4]] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
def test_opcheck(trans_w, device):
    torch.manual_seed(5)
    for sizes in ([3, 0, 4], [0, 0, 0], [7]):
        T, G = sum(sizes), len(sizes)
        x = torch.randn(T, 6, device=device, requires_grad=True)
        w = make_w(G, 6, 5, torch.float32, trans_w).to(device).requires_grad_(True)
        gs = torch.tensor(sizes, device=device)
        torch.library.opcheck(torch.ops.momoe.grouped_gemm.default, (x, w, gs, trans_w))
        dy = torch.randn(T, 5, device=device)
        torch.library.opcheck(torch.ops.momoe.grouped_gemm_dw.default, (x.detach(), dy, gs, trans_w))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    torch.manual_seed(6)
    x = torch.randn(37, 19, device=device, requires_grad=True)
    w = make_w(4, 19, 23, torch.float32, True).to(device).requires_grad_(True)
    gs = torch.tensor([5, 11, 0, 21], device=device)
    dy = torch.randn(37, 23, device=device)

    def f(x, w, gs):
        return grouped_gemm(x, w, gs, trans_w=True).relu() * 2

    compiled = torch.compile(f, fullgraph=True)
    ref = forward_backward(lambda x, w, gs, t: f(x, w, gs), x, w, gs, True, dy)
    out = forward_backward(lambda x, w, gs, t: compiled(x, w, gs), x, w, gs, True, dy)
    for name, r, o in zip(("y", "dx", "dw"), ref, out):
        assert_close(name, r, o, **TOLERANCES[torch.float32])
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
def test_reference_backend_parity(dtype, device):
    torch.manual_seed(7)
    x, w, gs = torch.randn(37, 19).to(dtype), make_w(4, 19, 23, dtype, False), torch.tensor([5, 0, 11, 21])
    dy = torch.randn(37, 23).to(dtype)
    x, w, gs, dy = x.to(device), w.to(device), gs.to(device), dy.to(device)
    kernel = forward_backward(grouped_gemm, x, w, gs, False, dy)
    with use_backend("reference"):
        reference = forward_backward(grouped_gemm, x, w, gs, False, dy)
    for name, r, o in zip(("y", "dx", "dw"), reference, kernel):
        assert o.dtype == r.dtype == dtype
        assert_close(name, r, o, **TOLERANCES[dtype])


# Each bad input: (id, x, w, group_sizes, trans_w, message regex).
def _bad_inputs():
    x, w, gs = torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([2, 3])
    return [
        ("x-int", x.long(), w, gs, False, "x must be float32, bfloat16 or float16"),
        ("x-w-dtype", x, w.double(), gs, False, "w must be float32, bfloat16 or float16"),
        ("mixed-dtype", x, w.bfloat16(), gs, False, "x and w must have the same dtype"),
        ("gs-float", x, w, gs.float(), False, "group_sizes must be an integer tensor"),
        ("w-meta", x, w.to("meta"), gs, False, "x and w must be on the same device"),
        ("x-rank", x[None], w, gs, False, "x must have 2 dimensions"),
        ("w-rank", x, w[0], gs, False, "w must have 3 dimensions"),
        ("gs-rank", x, w, gs[None], False, "group_sizes must have 1 dimensions"),
        ("K-mismatch", x, torch.randn(2, 5, 3), gs, False, r"x has K = 4 features but w .* has K = 5"),
        ("K-mismatch-trans", x, w, gs, True, r"x has K = 4 features but w \(trans_w=True.* has K = 3"),
        ("G-mismatch", x, w, torch.tensor([2, 3, 0]), False, r"one entry per group of w \(G = 2\), got 3"),
        ("negative", x, w, torch.tensor([-1, 6]), False, r"group_sizes must be >= 0, got group_sizes\[0\] = -1"),
        ("wrong-sum", x, w, torch.tensor([2, 2]), False, r"group_sizes must sum to .*T.* = 5, got sum 4"),
    ]


def on_device(t, device):
    """x / w / dy of a bad-input case on `device` (meta tensors stay meta; group_sizes stay on the host,
    where the CUDA glue checks their values with the CPU kernel's messages)."""
    return t if t.device.type == "meta" else t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_errors(case, device):
    _, x, w, gs, trans_w, match = case
    x, w = on_device(x, device), on_device(w, device)
    with pytest.raises(ERRORS, match=match):
        torch.ops.momoe.grouped_gemm(x, w, gs, trans_w)
    with pytest.raises(ERRORS, match=match):
        grouped_gemm(x, w, gs, trans_w)
    with use_backend("reference"), pytest.raises(ERRORS, match=match):
        grouped_gemm(x, w, gs, trans_w)


@pytest.mark.parametrize(
    "case",
    [
        ("rows", torch.randn(5, 4), torch.randn(6, 3), torch.tensor([2, 3]), "same number of rows"),
        ("dtype", torch.randn(5, 4), torch.randn(5, 3).half(), torch.tensor([2, 3]), "same dtype"),
        ("negative", torch.randn(5, 4), torch.randn(5, 3), torch.tensor([6, -1]), r"group_sizes\[1\] = -1"),
        ("wrong-sum", torch.randn(5, 4), torch.randn(5, 3), torch.tensor([2, 4]), "got sum 6"),
        ("dy-meta", torch.randn(5, 4), torch.randn(5, 3, device="meta"), torch.tensor([2, 3]), "same device"),
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_dw_bad_input_errors(case, device):
    _, x, dy, gs, match = case
    x, dy = on_device(x, device), on_device(dy, device)
    with pytest.raises(ERRORS, match=match):
        torch.ops.momoe.grouped_gemm_dw(x, dy, gs)
    if case[0] in ("negative", "wrong-sum", "rows"):
        with pytest.raises(ERRORS, match=match):
            naive.grouped_gemm_dw(x, dy, gs)


# ----------------------------------------------------------------------------- CUDA only

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
def test_cuda_kernels_are_registered():
    """A GPU build registers the CUDA kernels (a CPU-only momoe._C would otherwise fall through)."""
    for op in ("grouped_gemm", "grouped_gemm_dw"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"momoe::{op}", "CUDA"), op


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: case_id(dtype=d))
def test_cuda_no_host_sync(dtype):
    """Forward and backward with group sizes on the device never wait for the GPU."""
    torch.manual_seed(9)
    x = torch.randn(512, 128, device="cuda").to(dtype).requires_grad_()
    w = make_w(4, 128, 64, dtype, False).cuda().requires_grad_()
    gs = torch.tensor([200, 0, 256, 56], device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = grouped_gemm(x, w, gs)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    ref = naive.grouped_gemm(x.detach().float().cpu(), w.detach().float().cpu(), gs.cpu())
    assert_close("y", ref, y, **TOLERANCES[dtype])


@requires_cuda
def test_cuda_device_group_sizes_are_checked_on_the_device():
    """Bad group sizes on the device fail a device-side assertion naming the op and the argument (each in
    a fresh process: the assertion leaves the CUDA context unusable)."""
    program = """
import torch
import momoe.ops
x, w = torch.randn(5, 8, device="cuda"), torch.randn(2, 8, 8, device="cuda")
torch.ops.momoe.{op}(x, {other}, torch.tensor({sizes}, device="cuda"), False)
torch.cuda.synchronize()
"""
    cases = {
        "negative": ("grouped_gemm", "w", [-1, 6], "group_sizes must be >= 0"),
        "wrong-sum": ("grouped_gemm", "w", [2, 2], "group_sizes must sum to the number of rows of x (T)"),
        "dw-wrong-sum": ("grouped_gemm_dw", "x", [4, 4], "group_sizes must sum to the number of rows of x (T)"),
    }
    outputs = device_assert_outputs(
        {name: program.format(op=op, other=other, sizes=sizes) for name, (op, other, sizes, _) in cases.items()}
    )
    for name, (_, _, _, message) in cases.items():
        assert f"momoe: grouped_gemm: {message}" in outputs[name], outputs[name][-3000:]
