"""Selective scan: the kernel (torch.ops.momoe.selective_scan_*) against the pure-PyTorch reference.

Shape legend: B batch, D channels (dim), L time, N state size, G groups of B/C, M modalities.
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

from momoe.ops.backend import use_backend
from momoe.ops.selective_scan import naive, selective_scan, selective_state_update
from tests.utils import TOLERANCES, assert_close, case_id

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
ERRORS = (RuntimeError, ValueError, IndexError)


def make_inputs(
    batch=2,
    dim=8,
    L=17,
    N=4,
    G=1,
    M=None,
    dtype=torch.float32,
    param_dtype=None,
    state_dtype=torch.float32,
    D=True,
    z=True,
    delta_bias=True,
    delta_softplus=True,
    initial_state=True,
    mod_dtype=torch.int64,
    seed=0,
):
    """Random scan inputs (mamba-ssm's test distributions) as a kwargs dict of the public function."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or torch.float32

    def rand(*shape, dt=dtype):
        return torch.rand(*shape, generator=gen).to(dt)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    pre = () if M is None else (M,)
    bc_shape = (batch, N, L) if G == 1 else (batch, G, N, L)
    kw = dict(
        u=randn(batch, dim, L),
        delta=(0.5 * rand(batch, dim, L, dt=torch.float32)).to(dtype),
        A=(-0.5 - torch.rand(*pre, dim, N, generator=gen)).to(param_dtype),
        B=randn(*bc_shape, dt=param_dtype),
        C=randn(*bc_shape, dt=param_dtype),
        D=randn(*pre, dim, dt=param_dtype) if D else None,
        z=randn(batch, dim, L) if z else None,
        delta_bias=(0.5 * torch.rand(*pre, dim, generator=gen)).to(param_dtype) if delta_bias else None,
        delta_softplus=delta_softplus,
        modality=torch.randint(0, M, (batch, L), generator=gen).to(mod_dtype) if M is not None else None,
        initial_state=(0.5 * torch.randn(batch, dim, N, generator=gen)).to(state_dtype) if initial_state else None,
    )
    return kw


def float_inputs(kw):
    return [name for name in GRAD_NAMES if kw.get(name) is not None]


def run_scan(fn, kw, seed=1):
    """Forward and every gradient against random cotangents for out and last_state."""
    kw = {k: (v.detach().clone().requires_grad_(k in GRAD_NAMES) if isinstance(v, torch.Tensor) else v)
          for k, v in kw.items()}
    out, last = fn(**kw, return_last_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    g_last = torch.randn(last.shape, generator=gen).to(last.dtype)
    names = float_inputs(kw)
    outputs, cotangents = [], []
    for o, g in ((out, g_out), (last, g_last)):
        if o.requires_grad:
            outputs.append(o)
            cotangents.append(g)
    grads = torch.autograd.grad(
        outputs, [kw[n] for n in names], cotangents, allow_unused=True, materialize_grads=True
    )
    return out.detach(), last.detach(), dict(zip(names, grads))


def kernel_scan(**kw):
    with use_backend("kernel"):
        return selective_scan(**kw)


def compare(kw, tol=None, ref_fn=naive.selective_scan, fn=kernel_scan):
    tol = tol or TOLERANCES[kw["u"].dtype]
    out_ref, last_ref, grads_ref = run_scan(ref_fn, kw)
    out, last, grads = run_scan(fn, kw)
    assert out.dtype == kw["u"].dtype and last.dtype == torch.float32
    assert_close("out", out_ref, out, **tol)
    assert_close("last_state", last_ref, last, **tol)
    for name, ref in grads_ref.items():
        assert grads[name].dtype == kw[name].dtype, f"d{name}: dtype {grads[name].dtype} != {kw[name].dtype}"
        assert_close(f"d{name}", ref, grads[name], **tol)


# ----------------------------------------------------------------------------- forward + backward

CORE = []
for L in (0, 1, 17, 256, 257, 600):
    for M in (None, 3):
        for G in (1, 2):
            CORE.append(dict(L=L, M=M, G=G, dtype=torch.float32))
for dtype in (torch.bfloat16, torch.float16):
    for L in (0, 17, 257):
        for M in (None, 3):
            for G in (1, 2):
                CORE.append(dict(L=L, M=M, G=G, dtype=dtype, param_dtype=dtype, state_dtype=dtype))


@pytest.mark.parametrize(
    "case", CORE, ids=[case_id(L=c["L"], M=c["M"] or 0, G=c["G"], dtype=c["dtype"]) for c in CORE]
)
def test_scan_matches_reference(case):
    long = case["L"] >= 256
    dim = (24 if long else 12) if case["G"] == 2 else (16 if long else 8)
    compare(make_inputs(dim=dim, N=16 if case["L"] == 600 else 4 + 4 * long, **case))


def time_major(x: torch.Tensor, pair: bool = False) -> torch.Tensor:
    """(batch, dim, L) values as the transpose of a (batch, L, dim) activation; with `pair`, the first
    half of a (batch, L, 2 dim) tensor (how a Mamba block's x and z come out of in_proj)."""
    t = x.transpose(1, 2)
    if pair:
        t = torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : x.shape[1]]
    return t.contiguous().transpose(1, 2) if not pair else t.transpose(1, 2)


@pytest.mark.parametrize("layout", ["channel-major", "time-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_scan_every_instruction_set(isa, dtype, layout, monkeypatch):
    """Each CPU build of the kernel (MOMOE_CPU_ISA narrows the run-time choice) against the reference:
    dim 40 = two full 16-channel tiles and a partial one, L 275 = full 16-step blocks, a tail and a
    chunk boundary (the AVX-512 transposes and scalef exp, and their scalar fallbacks); u, delta and z
    in mamba-ssm's layout or time-major (z a slice of a wider tensor)."""
    if isa != "native":
        monkeypatch.setenv("MOMOE_CPU_ISA", isa)
    low = dtype != torch.float32
    kw = make_inputs(dim=40, L=275, N=16, M=3, dtype=dtype, param_dtype=dtype if low else None,
                     state_dtype=dtype if low else torch.float32)
    if layout == "time-major":
        kw.update(u=time_major(kw["u"]), delta=time_major(kw["delta"]), z=time_major(kw["z"], pair=True))
    compare(kw)


def test_output_and_gradient_layouts():
    """Outputs follow the inputs' layouts (time-major in, time-major out), so that a model feeding the
    scan from linear layers and feeding its output to one never copies."""
    kw = make_inputs(dim=16, L=33, N=4, M=3)
    kw.update(u=time_major(kw["u"]), delta=time_major(kw["delta"]), z=time_major(kw["z"], pair=True))
    out, _, grads = run_scan(kernel_scan, kw)
    assert out.transpose(1, 2).is_contiguous()
    for name in ("u", "delta"):
        assert grads[name].transpose(1, 2).is_contiguous(), name
    assert grads["z"].stride(1) == 1
    cm = make_inputs(dim=16, L=33, N=4)
    out, _, grads = run_scan(kernel_scan, cm)
    assert out.is_contiguous() and grads["u"].is_contiguous() and grads["delta"].is_contiguous()


def test_opcheck_time_major():
    kw = make_inputs(dim=16, L=20, N=4, M=3)
    args = (time_major(kw["u"]), time_major(kw["delta"]), kw["A"], kw["B"], kw["C"], kw["D"],
            time_major(kw["z"], pair=True), kw["delta_bias"], True, kw["modality"], kw["initial_state"])
    torch.library.opcheck(torch.ops.momoe.selective_scan_fwd.default, args)


@pytest.mark.parametrize("used", ["out", "out_sum", "last_state"])
def test_scan_backward_one_output(used):
    """Backward when only one of (out, last_state) reaches the loss (the other cotangent is absent)."""
    kw = make_inputs(L=45, M=3, G=2, dim=8)
    grads = {}
    for name, fn in (("ref", naive.selective_scan), ("kernel", kernel_scan)):
        args = {k: (v.detach().clone().requires_grad_(k in GRAD_NAMES) if isinstance(v, torch.Tensor) else v)
                for k, v in kw.items()}
        out, last = fn(**args, return_last_state=True)
        # out_sum: the cotangent of out is an expanded (stride 0) tensor
        loss = {"out": lambda: out.float().square().sum(), "out_sum": lambda: out.sum(),
                "last_state": lambda: last.square().sum()}[used]()
        names = float_inputs(args)
        grads[name] = torch.autograd.grad(loss, [args[n] for n in names], allow_unused=True, materialize_grads=True)
    for n, ref, got in zip(float_inputs(kw), grads["ref"], grads["kernel"]):
        assert_close(f"d{n}", ref, got, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
def test_backward_deterministic_across_threads(M):
    """The reductions (dA, dD, ddelta_bias over batch and time, dB/dC over channels) do not depend on threads."""
    kw = make_inputs(batch=3, L=300, dim=16, N=8, G=2, M=M)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_scan(kernel_scan, kw)
        torch.set_num_threads(max(2, threads))
        many = run_scan(kernel_scan, kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    for name in one[2]:
        assert torch.equal(one[2][name], many[2][name]), f"d{name} depends on the thread count"


OPTIONS = []
for M in (None, 3):
    for D in (False, True):
        for z in (False, True):
            for bias in (False, True):
                for softplus in (False, True):
                    for init in (False, True):
                        if (D, z, bias, softplus, init).count(True) in (0, 1, 4, 5) or (D and init):
                            OPTIONS.append(dict(M=M, D=D, z=z, delta_bias=bias, delta_softplus=softplus,
                                                initial_state=init))


@pytest.mark.parametrize("L", [0, 33], ids=lambda L: f"L{L}")
@pytest.mark.parametrize(
    "case",
    OPTIONS,
    ids=[case_id(M=c["M"] or 0, D=c["D"], z=c["z"], bias=c["delta_bias"], softplus=c["delta_softplus"],
                 init=c["initial_state"]) for c in OPTIONS],
)
def test_scan_optional_arguments(case, L):
    compare(make_inputs(L=L, dim=10, N=5, **case))


@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize(
    "param_dtype,dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
     (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
    ids=["params_fp32-u_bf16", "params_bf16-u_bf16", "params_fp32-u_fp16", "params_fp16-u_fp16",
         "bad_mix"],
)
@pytest.mark.parametrize("state_dtype", [torch.float32, "u"], ids=["state_fp32", "state_u"])
def test_scan_mixed_dtypes(M, param_dtype, dtype, state_dtype):
    if param_dtype not in (torch.float32, dtype):  # a third dtype is an error, see test_bad_inputs
        kw = make_inputs(M=M, dtype=dtype, param_dtype=param_dtype)
        with pytest.raises(ERRORS, match="dtype|float32|bfloat16|must"):
            kernel_scan(**kw)
        return
    state_dtype = dtype if state_dtype == "u" else state_dtype
    kw = make_inputs(L=40, dim=16, N=8, G=2, M=M, dtype=dtype, param_dtype=param_dtype, state_dtype=state_dtype)
    compare(kw)


@pytest.mark.parametrize("mod_dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_scan_modality_dtypes(mod_dtype):
    kw = make_inputs(L=29, M=3, mod_dtype=mod_dtype)
    compare(kw)
    # the modality dtype changes nothing
    ref = kernel_scan(**{**kw, "modality": kw["modality"].long()})
    assert_close("out(int64 modality)", ref, kernel_scan(**kw), atol=0, rtol=0)


@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_scan_non_contiguous(M, dtype):
    kw = make_inputs(L=37, dim=12, N=6, G=2, M=M, dtype=dtype, param_dtype=dtype)
    batch, dim, L = kw["u"].shape
    # u and delta as transposed views, B/C and z as strided slices, A transposed
    kw["u"] = kw["u"].transpose(1, 2).contiguous().transpose(1, 2)
    kw["delta"] = kw["delta"].transpose(0, 2).contiguous().transpose(0, 2)
    kw["B"] = torch.cat([kw["B"], kw["B"]], dim=-1)[..., ::2]
    kw["C"] = kw["C"].transpose(-1, -2).contiguous().transpose(-1, -2)
    kw["z"] = torch.stack([kw["z"], kw["z"]], dim=-1)[..., 0]
    kw["A"] = kw["A"].transpose(-1, -2).contiguous().transpose(-1, -2)
    if M is not None:
        kw["modality"] = torch.stack([kw["modality"], kw["modality"]], dim=1)[:, 0]
    assert not kw["u"].is_contiguous() and not kw["delta"].is_contiguous() and not kw["B"].is_contiguous()
    compare(kw)


def test_scan_softplus_threshold():
    # dt around mamba-ssm's softplus threshold (identity above 20)
    kw = make_inputs(L=21, M=3)
    kw["delta"] = 18.5 + 3.0 * torch.rand(kw["delta"].shape, generator=torch.Generator().manual_seed(3))
    kw["A"] = kw["A"] * 0.05
    compare(kw)


def test_scan_batch_zero():
    compare(make_inputs(batch=0, L=9, M=3, G=2, dim=4))


# ----------------------------------------------------------------------------- invariants


def in_pieces(scan, bounds):
    """`scan` run over the pieces [bounds[i], bounds[i + 1]) of the sequence, each starting from the
    previous one's last state (chunked prefill); same signature as selective_scan with
    return_last_state=True."""

    def run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, modality, initial_state, return_last_state):
        outs, state = [], initial_state
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            out, state = scan(
                u=u[..., lo:hi], delta=delta[..., lo:hi], A=A, B=B[..., lo:hi], C=C[..., lo:hi], D=D,
                z=z[..., lo:hi], delta_bias=delta_bias, delta_softplus=delta_softplus,
                modality=None if modality is None else modality[:, lo:hi], initial_state=state,
                return_last_state=True,
            )
            outs.append(out)
        return torch.cat(outs, dim=-1), state

    return run


@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_chunked_scan_equals_whole(M, dtype):
    """Scanning [0, 137), [137, 393), [393, 600) with initial_state/last_state equals one scan."""
    kw = make_inputs(L=600, dim=8, N=4, G=2, M=M, dtype=dtype, param_dtype=torch.float32)
    tol = TOLERANCES[dtype]
    out_ref, last_ref, grads_ref = run_scan(kernel_scan, kw)
    out, last, grads = run_scan(in_pieces(kernel_scan, (0, 137, 393, 600)), kw)
    assert_close("out", out_ref, out, **tol)
    assert_close("last_state", last_ref, last, **tol)
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], **tol)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("G", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32-state_fp32", "bf16-state_fp32", "bf16-state_bf16"],
)
def test_decode_equals_scan(backend, M, G, dtype, state_dtype):
    kw = make_inputs(L=23, dim=12, N=4, G=G, M=M, dtype=dtype, param_dtype=torch.float32,
                     state_dtype=state_dtype)
    with use_backend(backend):
        out_ref, last_ref = selective_scan(**kw, return_last_state=True)
        state = kw["initial_state"].clone()
        ys = []
        with torch.no_grad():
            for t in range(kw["u"].shape[-1]):
                y = selective_state_update(
                    state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t],
                    D=kw["D"], z=kw["z"][..., t], dt_bias=kw["delta_bias"], dt_softplus=kw["delta_softplus"],
                    modality=None if M is None else kw["modality"][:, t],
                )
                assert y.dtype == dtype and state.dtype == state_dtype
                ys.append(y)
    # a bf16 state is rounded at every step, the scan keeps it in fp32
    tol = TOLERANCES[dtype] if state_dtype == torch.float32 else dict(atol=8e-2, rtol=8e-2)
    assert_close("y", out_ref, torch.stack(ys, dim=-1), **tol)
    assert_close("state", last_ref, state, **tol)


@pytest.mark.parametrize("G", [1, 2], ids=lambda g: f"G{g}")
def test_identical_modalities_equal_no_modality(G):
    kw = make_inputs(L=45, dim=8, G=G, M=None)
    shared = kernel_scan(**kw, return_last_state=True)
    split = dict(kw)
    for name in ("A", "D", "delta_bias"):
        split[name] = kw[name].expand(3, *kw[name].shape).contiguous()
    split["modality"] = torch.randint(0, 3, kw["u"].shape[::2])
    got = kernel_scan(**split, return_last_state=True)
    for name, a, b in zip(("out", "last_state"), shared, got):
        assert_close(name, a, b, **TOLERANCES[torch.float32])


def test_reference_backend_parity():
    kw = make_inputs(L=40, M=3, G=2, dim=8)
    with use_backend("reference"):
        out_ref, last_ref, grads_ref = run_scan(selective_scan, kw)
    out_naive, last_naive, grads_naive = run_scan(naive.selective_scan, kw)
    assert torch.equal(out_ref, out_naive) and torch.equal(last_ref, last_naive)
    for name in grads_ref:
        assert torch.equal(grads_ref[name], grads_naive[name]), name
    out, last, grads = run_scan(kernel_scan, kw)
    tol = TOLERANCES[torch.float32]
    assert_close("out", out_ref, out, **tol)
    assert_close("last_state", last_ref, last, **tol)
    for name in grads_ref:
        assert_close(f"d{name}", grads_ref[name], grads[name], **tol)


# ----------------------------------------------------------------------------- torch.library / compile


def _op_args(kw):
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "modality", "initial_state")
    return tuple(kw[n] for n in names)


@pytest.mark.parametrize("full", [False, True], ids=["required_only", "all_optional"])
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
def test_opcheck_selective_scan_fwd(full, M):
    kw = make_inputs(L=19, dim=4, N=3, G=2 if full else 1, M=M, D=full, z=full, delta_bias=full,
                     delta_softplus=full, initial_state=full)
    for name in float_inputs(kw):
        kw[name] = kw[name].requires_grad_()
    torch.library.opcheck(torch.ops.momoe.selective_scan_fwd.default, _op_args(kw))


@pytest.mark.parametrize("full", [False, True], ids=["required_only", "all_optional"])
def test_opcheck_selective_scan_bwd(full):
    kw = make_inputs(L=19, dim=4, N=3, M=3 if full else None, D=full, z=full, delta_bias=full,
                     initial_state=full)
    out, last, chunk_states = torch.ops.momoe.selective_scan_fwd(*_op_args(kw))
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last) if full else None
    torch.library.opcheck(torch.ops.momoe.selective_scan_bwd.default, (dout, dlast, *_op_args(kw), chunk_states))


@pytest.mark.parametrize("full", [False, True], ids=["required_only", "all_optional"])
def test_opcheck_selective_state_update(full):
    kw = make_inputs(L=1, dim=4, N=3, G=2 if full else 1, M=3 if full else None, D=full, z=full,
                     delta_bias=full, delta_softplus=full)
    state = torch.randn(2, 4, 3)
    z = kw["z"][..., 0] if full else None
    args = (state, kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0], kw["D"], z,
            kw["delta_bias"], kw["delta_softplus"], None if kw["modality"] is None else kw["modality"][:, 0])
    torch.library.opcheck(torch.ops.momoe.selective_state_update.default, args)


def test_chunk_states_layout():
    kw = make_inputs(L=600, dim=4, N=3, M=3)
    out, last, chunk_states = torch.ops.momoe.selective_scan_fwd(*_op_args(kw))
    assert chunk_states.shape == (2, 4, 3, 3) and chunk_states.dtype == torch.float32
    assert_close("chunk 0", kw["initial_state"], chunk_states[:, :, 0], atol=0, rtol=0)
    for c in (1, 2):
        _, state = naive.selective_scan(**{**kw, **{k: kw[k][..., : 256 * c] for k in ("u", "delta", "B", "C", "z")},
                                           "modality": kw["modality"][:, : 256 * c]}, return_last_state=True)
        assert_close(f"chunk {c}", state, chunk_states[:, :, c], **TOLERANCES[torch.float32])
    empty = torch.ops.momoe.selective_scan_fwd(*_op_args(make_inputs(L=0, dim=4, N=3)))
    assert empty[2].shape == (2, 4, 0, 3)


@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
def test_torch_compile_fullgraph(M):
    torch._dynamo.reset()
    kw = make_inputs(L=21, dim=8, N=4, G=2, M=M)

    def f(u, delta, A, B, C, D, z, delta_bias, modality, initial_state):
        out, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, True, modality, initial_state,
                                   return_last_state=True)
        return out * 2.0, last.sum(-1)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)

    def run(fn):
        args = {k: (v.detach().clone().requires_grad_(k in GRAD_NAMES) if isinstance(v, torch.Tensor) else v)
                for k, v in kw.items() if k != "delta_softplus"}
        out, last = fn(**args)
        (out.square().sum() + last.sum()).backward()
        return out.detach(), last.detach(), {n: args[n].grad for n in float_inputs(args)}

    with use_backend("kernel"):
        ref = run(f)
        got = run(compiled)
    tol = TOLERANCES[torch.float32]
    assert_close("out", ref[0], got[0], **tol)
    assert_close("last", ref[1], got[1], **tol)
    for name in ref[2]:
        assert_close(f"d{name}", ref[2][name], got[2][name], **tol)
    torch._dynamo.reset()


def test_torch_compile_state_update():
    torch._dynamo.reset()
    kw = make_inputs(L=3, dim=8, N=4, G=2, M=3)

    def step(state, t):
        return selective_state_update(
            state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t], kw["D"],
            kw["z"][..., t], kw["delta_bias"], True, kw["modality"][:, t],
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    with use_backend("kernel"), torch.no_grad():
        state_ref, state = kw["initial_state"].clone(), kw["initial_state"].clone()
        for t in range(3):
            assert_close(f"y[{t}]", step(state_ref, t), compiled(state, t), **TOLERANCES[torch.float32])
            assert_close(f"state[{t}]", state_ref, state, **TOLERANCES[torch.float32])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- bad inputs


def _bad_scan_cases():
    good = dict(L=9, dim=8, N=4, M=3, G=2)
    cases = []

    def add(name, match, change, **make):
        kw = make_inputs(**{**good, **make})
        change(kw)
        cases.append(pytest.param(kw, match, id=name))

    def setitem(**items):
        return lambda kw: kw.update(items)

    add("u_int_dtype", r"u.*(dtype|float)", lambda kw: kw.update(u=kw["u"].to(torch.int32)))
    add("u_fp64", r"u.*(dtype|float)", lambda kw: kw.update(u=kw["u"].double()))
    add("delta_other_dtype", r"delta.*(dtype|float)", lambda kw: kw.update(delta=kw["delta"].bfloat16()))
    add("z_other_dtype", r"z.*(dtype|float)", lambda kw: kw.update(z=kw["z"].half()))
    add("A_third_dtype", r"A.*(dtype|float)", lambda kw: kw.update(A=kw["A"].half()), dtype=torch.bfloat16)
    add("B_fp64", r"B.*(dtype|float)", lambda kw: kw.update(B=kw["B"].double()))
    add("D_third_dtype", r"D.*(dtype|float)", lambda kw: kw.update(D=kw["D"].bfloat16()), dtype=torch.float16)
    add("initial_state_fp64", r"initial_state.*(dtype|float)",
        lambda kw: kw.update(initial_state=kw["initial_state"].double()))
    add("modality_float", r"modality.*(integer|dtype)", lambda kw: kw.update(modality=kw["modality"].float()))
    add("u_rank2", r"u.*(rank|dimensions|shape)", lambda kw: kw.update(u=kw["u"][0]))
    add("delta_shape", r"delta.*(shape|size)", lambda kw: kw.update(delta=kw["delta"][..., :-1]))
    add("z_shape", r"z.*(shape|size)", lambda kw: kw.update(z=kw["z"][:, :-1]))
    add("B_rank5", r"B.*(rank|dimensions|shape)", lambda kw: kw.update(B=kw["B"][:, None]))
    add("B_length", r"B.*(shape|size|length)", lambda kw: kw.update(B=kw["B"][..., :-1]))
    add("C_state_size", r"C.*(shape|size)", lambda kw: kw.update(C=kw["C"][:, :, :-1]))
    add("B_groups_not_dividing", r"divisible|group", lambda kw: kw.update(
        B=kw["B"].new_zeros(2, 3, 4, 9), C=kw["C"].new_zeros(2, 3, 4, 9)))
    add("A_dim", r"A.*(shape|size)", lambda kw: kw.update(A=kw["A"][:, :-1]))
    add("D_dim", r"D.*(shape|size)", lambda kw: kw.update(D=kw["D"][:, :-1]))
    add("delta_bias_rank", r"delta_bias.*(rank|dimensions|shape)", lambda kw: kw.update(delta_bias=kw["delta_bias"][0]))
    add("initial_state_shape", r"initial_state.*(shape|size)",
        lambda kw: kw.update(initial_state=kw["initial_state"][..., :-1]))
    add("modality_shape", r"modality.*(shape|size)", lambda kw: kw.update(modality=kw["modality"][:, :-1]))
    add("modality_negative", r"modality", lambda kw: kw["modality"].__setitem__((1, 4), -1))
    add("modality_too_large", r"modality", lambda kw: kw["modality"].__setitem__((0, 8), 3))
    add("modality_counts_D", r"mismatched modality counts", lambda kw: kw.update(D=kw["D"][:2]))
    add("modality_counts_delta_bias", r"mismatched modality counts",
        lambda kw: kw.update(delta_bias=torch.cat([kw["delta_bias"], kw["delta_bias"]])))
    add("modality_with_2d_A", r"A.*(rank|dimensions|shape|modality)", lambda kw: kw.update(A=kw["A"][0]))
    add("3d_A_without_modality", r"A.*(rank|dimensions|shape|modality)", lambda kw: kw.update(modality=None))
    add("meta_device", r"device|CPU|meta", lambda kw: kw.update(B=kw["B"].to("meta")))
    return cases


@pytest.mark.parametrize("kw,match", _bad_scan_cases())
@pytest.mark.parametrize("entry", ["op", "public", "reference"])
def test_bad_inputs(kw, match, entry):
    if entry == "op":
        with pytest.raises(ERRORS, match=match):
            torch.ops.momoe.selective_scan_fwd(*_op_args(kw))
    else:
        with use_backend("kernel" if entry == "public" else "reference"), pytest.raises(ERRORS, match=match):
            selective_scan(**kw)


def test_bad_chunk_states():
    kw = make_inputs(L=300, dim=4, N=3, M=3)
    out, last, chunk_states = torch.ops.momoe.selective_scan_fwd(*_op_args(kw))
    for bad in (chunk_states[:, :, :1], chunk_states[..., :-1], chunk_states.double()):
        with pytest.raises(ERRORS, match="chunk_states"):
            torch.ops.momoe.selective_scan_bwd(torch.randn_like(out), None, *_op_args(kw), bad)


def _bad_update_cases():
    def args(**make):
        kw = make_inputs(L=1, dim=8, N=4, G=2, M=3, initial_state=True, **make)
        return dict(state=kw["initial_state"], x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"],
                    B=kw["B"][..., 0], C=kw["C"][..., 0], D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"],
                    dt_softplus=True, modality=kw["modality"][:, 0].clone())

    cases = []

    def add(name, match, change):
        a = args()
        change(a)
        cases.append(pytest.param(a, match, id=name))

    add("x_rank3", r"x.*(rank|dimensions|shape)", lambda a: a.update(x=a["x"][..., None]))
    add("x_int", r"x.*(dtype|float)", lambda a: a.update(x=a["x"].long()))
    add("dt_shape", r"dt.*(shape|size)", lambda a: a.update(dt=a["dt"][:, :-1]))
    add("state_shape", r"state.*(shape|size)", lambda a: a.update(state=a["state"][..., :-1]))
    add("state_dtype", r"state.*(dtype|float)", lambda a: a.update(state=a["state"].double()))
    add("B_shape", r"B.*(shape|size)", lambda a: a.update(B=a["B"][..., :-1]))
    add("groups_not_dividing", r"divisible|group", lambda a: a.update(
        B=a["B"].new_zeros(2, 3, 4), C=a["C"].new_zeros(2, 3, 4)))
    add("modality_shape", r"modality.*(shape|size)", lambda a: a.update(modality=a["modality"][:1]))
    add("modality_negative", r"modality", lambda a: a["modality"].__setitem__(0, -1))
    add("modality_too_large", r"modality", lambda a: a["modality"].__setitem__(1, 3))
    add("modality_counts", r"mismatched modality counts", lambda a: a.update(dt_bias=a["dt_bias"][:1]))
    add("modality_with_2d_A", r"A.*(rank|dimensions|shape|modality)", lambda a: a.update(A=a["A"][0]))
    return cases


@pytest.mark.parametrize("kw,match", _bad_update_cases())
@pytest.mark.parametrize("entry", ["op", "public", "reference"])
def test_bad_inputs_state_update(kw, match, entry):
    if entry == "op":
        with pytest.raises(ERRORS, match=match):
            torch.ops.momoe.selective_state_update(*kw.values())
    else:
        with use_backend("kernel" if entry == "public" else "reference"), pytest.raises(ERRORS, match=match):
            selective_state_update(**kw)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_state_update_refuses_grad(backend):
    kw = make_inputs(L=1, M=None)
    x = kw["u"][..., 0].requires_grad_()
    state = torch.zeros(2, 8, 4)
    with use_backend(backend), pytest.raises(RuntimeError, match="inference only.*x requires grad"):
        selective_state_update(state, x, kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    with use_backend(backend), torch.no_grad():
        selective_state_update(state, x, kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])


# ----------------------------------------------------------------------------- mamba-ssm parity


def _load_mamba_selective_scan_ref():
    """mamba-ssm's pure-PyTorch selective_scan_ref, loaded without its CUDA extensions.

    `import mamba_ssm` fails without CUDA, so selective_scan_interface.py is loaded from its file with the
    modules it imports but does not need for the reference (selective_scan_cuda, the Triton layer norm and
    mamba_ssm's package __init__) stubbed in sys.modules; sys.modules is restored afterwards.
    """
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mamba-ssm is not installed (pip install einops; MAMBA_SKIP_CUDA_BUILD=TRUE "
                    "MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm)")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("mamba-ssm's selective_scan_interface needs einops (pip install einops)")
    path = os.path.join(spec.submodule_search_locations[0], "ops", "selective_scan_interface.py")
    if not os.path.exists(path):
        pytest.skip(f"mamba-ssm is installed but {path} is missing")

    def identity_decorator(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    stubs = {}
    for name in ("mamba_ssm", "mamba_ssm.utils", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        stubs[name] = types.ModuleType(name)
        stubs[name].__path__ = []
    stubs["mamba_ssm.utils.torch"] = types.ModuleType("mamba_ssm.utils.torch")
    stubs["mamba_ssm.utils.torch"].custom_fwd = identity_decorator
    stubs["mamba_ssm.utils.torch"].custom_bwd = identity_decorator
    stubs["mamba_ssm.ops.triton.layer_norm"] = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    stubs["mamba_ssm.ops.triton.layer_norm"]._layer_norm_fwd = None
    stubs["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    for name in ("causal_conv1d", "causal_conv1d.cpp_functions"):  # optional in the file (try/except ImportError)
        stubs[name] = None  # a None entry makes `import` raise ImportError
    saved = {name: sys.modules.get(name, _MISSING) for name in stubs}
    try:
        sys.modules.update(stubs)
        module_spec = importlib.util.spec_from_file_location("_momoe_test_mamba_selective_scan_interface", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module.selective_scan_ref


_MISSING = object()


@pytest.mark.parametrize(
    "G,D,z,bias,softplus,dtype",
    [(1, False, False, False, False, torch.float32), (1, True, True, True, True, torch.float32),
     (2, True, True, False, True, torch.float32), (2, True, False, True, False, torch.bfloat16),
     (1, True, True, True, True, torch.float16)],
    ids=["plain", "all", "G2-D-z-softplus", "G2-D-bias-bf16", "all-fp16"],
)
def test_naive_matches_mamba_ssm_reference(G, D, z, bias, softplus, dtype):
    mamba_ref = _load_mamba_selective_scan_ref()
    kw = make_inputs(L=70, dim=8, N=4, G=G, M=None, dtype=dtype, D=D, z=z, delta_bias=bias,
                     delta_softplus=softplus, initial_state=False)
    kw.pop("modality"), kw.pop("initial_state")
    out_ref, last_ref = mamba_ref(**kw, return_last_state=True)
    out, last = naive.selective_scan(**kw, return_last_state=True)
    assert out.dtype == out_ref.dtype
    # same fp32 math up to the order of the sum over N; low-precision outputs may round one ulp apart
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close("out", out_ref, out, **tol)
    assert_close("last_state", last_ref, last, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CUDA kernels
# The same contract on the GPU: the kernels run on CUDA, the fp32 reference on the CPU. Inputs are
# copied to the GPU inside the differentiable call, so gradients come back to the CPU leaves.

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(kw):
    """The CPU tensors of a kwargs dict copied to the GPU (dense layouts kept); others unchanged."""
    return {k: (v.cuda() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v) for k, v in kw.items()}


def cuda_scan(transform=None):
    """selective_scan's CUDA kernel for CPU inputs, with the same signature: inputs copied to the GPU
    (then rewritten by `transform(kw)`, e.g. into other strides), outputs copied back."""

    def run(**kw):
        kw = to_cuda(kw)
        if transform is not None:
            transform(kw)
        with use_backend("kernel"):
            result = selective_scan(**kw)
        return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()

    return run


def modality_runs(batch, L, M, run=300):
    """(batch, L) modality ids in runs of `run` tokens (most 256-step chunks hold one modality; the
    kernels take a faster path for those), shifted from sequence to sequence."""
    t = torch.arange(L)
    return torch.stack([((t + 97 * b) // run) % M for b in range(batch)])


CUDA_CORE = [
    dict(L=L, M=M, G=G, dtype=dtype, runs=runs)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for L in (1, 17, 255, 256, 257, 1000)
    for M, G, runs in ((None, 1, False), (1, 2, False), (3, 1, False), (3, 2, True))
]


@requires_cuda
@pytest.mark.parametrize(
    "case", CUDA_CORE,
    ids=[case_id(L=c["L"], M=c["M"] or 0, G=c["G"], dtype=c["dtype"], runs=c["runs"]) for c in CUDA_CORE],
)
def test_cuda_scan_matches_reference(case):
    """Forward and every gradient. dim 20: per group of B/C a full and a partial block of channels;
    fp16 with fp16 parameters and initial state, bf16 and fp32 with fp32 ones."""
    case = dict(case)
    runs = case.pop("runs")
    low = dict(param_dtype=torch.float16, state_dtype=torch.float16) if case["dtype"] == torch.float16 else {}
    kw = make_inputs(dim=20, N=16 if case["L"] == 1000 else 5, **case, **low)
    if runs:
        kw["modality"] = modality_runs(2, case["L"], case["M"])
    compare(kw, fn=cuda_scan())


@requires_cuda
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_cuda_scan_layouts(dtype, M):
    """u, delta, z as transposes of (batch, L, dim) activations (z a slice of a wider tensor): the kernel
    reads them without copies and writes out, du, ddelta, dz in the same layouts as the CPU kernel."""
    kw = make_inputs(dim=24, L=300, N=8, G=2, M=M, dtype=dtype)
    out_ref, last_ref, grads_ref = run_scan(naive.selective_scan, kw)
    gpu = to_cuda(kw)
    gpu.update(u=time_major(gpu["u"]), delta=time_major(gpu["delta"]), z=time_major(gpu["z"], pair=True))
    out, last, grads = run_scan(kernel_scan, gpu)
    assert out.transpose(1, 2).is_contiguous()
    for name in ("u", "delta"):
        assert grads[name].transpose(1, 2).is_contiguous(), name
    assert grads["z"].stride(1) == 1
    tol = TOLERANCES[dtype]
    assert_close("out", out_ref, out.cpu(), **tol)
    assert_close("last_state", last_ref, last.cpu(), **tol)
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name].cpu(), **tol)


def _other_strides(kw):
    """Rewrites GPU scan inputs into strides neither channel- nor time-major (and non-contiguous B, C, A,
    modality); differentiable, so gradients flow back to the contiguous originals."""
    kw["u"] = kw["u"].transpose(0, 2).contiguous().transpose(0, 2)
    kw["delta"] = torch.stack([kw["delta"], kw["delta"]], dim=-1)[..., 1]
    kw["z"] = kw["z"].transpose(0, 1).contiguous().transpose(0, 1)
    kw["B"] = torch.stack([kw["B"], kw["B"]], dim=-1)[..., 0]
    kw["C"] = kw["C"].transpose(-1, -2).contiguous().transpose(-1, -2)
    kw["A"] = kw["A"].transpose(-1, -2).contiguous().transpose(-1, -2)
    if kw["modality"] is not None:
        kw["modality"] = torch.stack([kw["modality"], kw["modality"]], dim=1)[:, 0]
    assert not (kw["u"].is_contiguous() or kw["delta"].is_contiguous() or kw["B"].is_contiguous())


@requires_cuda
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: case_id(dtype=d))
def test_cuda_scan_non_contiguous(dtype, M):
    compare(make_inputs(L=263, dim=12, N=6, G=2, M=M, dtype=dtype), fn=cuda_scan(_other_strides))


@requires_cuda
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_cuda_chunked_prefill_equals_whole(M, dtype):
    """Prefill in pieces (through initial_state/last_state; inside and across 256-step chunks) equals one
    scan on CUDA, forward and backward."""
    kw = make_inputs(L=700, dim=8, N=4, G=2, M=M, dtype=dtype)
    whole = run_scan(cuda_scan(), kw)
    pieces = run_scan(in_pieces(cuda_scan(), (0, 1, 137, 256, 513, 700)), kw)
    tol = TOLERANCES[dtype]
    assert_close("out", whole[0], pieces[0], **tol)
    assert_close("last_state", whole[1], pieces[1], **tol)
    for name, ref in whole[2].items():
        assert_close(f"d{name}", ref, pieces[2][name], **tol)


@requires_cuda
@pytest.mark.parametrize("L", [0, 33], ids=lambda L: f"L{L}")
@pytest.mark.parametrize(
    "case", OPTIONS,
    ids=[case_id(M=c["M"] or 0, D=c["D"], z=c["z"], bias=c["delta_bias"], softplus=c["delta_softplus"],
                 init=c["initial_state"]) for c in OPTIONS],
)
def test_cuda_scan_optional_arguments(case, L):
    compare(make_inputs(L=L, dim=10, N=5, **case), fn=cuda_scan())


@requires_cuda
def test_cuda_scan_edge_cases():
    """Empty batch; the softplus threshold; modality ids of every integer dtype; a large M * N."""
    compare(make_inputs(batch=0, L=9, M=3, G=2, dim=4), fn=cuda_scan())
    kw = make_inputs(L=21, M=3)
    kw["delta"] = 18.5 + 3.0 * torch.rand(kw["delta"].shape, generator=torch.Generator().manual_seed(3))
    kw["A"] = kw["A"] * 0.05
    compare(kw, fn=cuda_scan())
    for mod_dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        compare(make_inputs(L=29, M=3, mod_dtype=mod_dtype), fn=cuda_scan())
    compare(make_inputs(L=40, dim=8, N=64, M=8), fn=cuda_scan())


@requires_cuda
@pytest.mark.parametrize("N", [3, 16, 64], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
@pytest.mark.parametrize("G", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize(
    "dtype,state_dtype,bc_dtype",
    [(torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.float32, torch.bfloat16),
     (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, torch.float32, torch.float16)],
    ids=["fp32", "bf16-state_fp32", "bf16-state_bf16-bc_fp32", "fp16-state_fp32"],
)
def test_cuda_state_update_matches_reference(dtype, state_dtype, bc_dtype, G, M, N):
    """One decoding step against the reference: y and the state updated in place; x, dt, z, B and C are
    slices of wider tensors (as they come out of a projection)."""
    kw = make_inputs(L=1, dim=12, N=N, G=G, M=M, dtype=dtype, state_dtype=state_dtype)

    def sliced(x):  # step 0 of x: (..., K, 1) -> (..., K), as a slice of a (..., 2 K) tensor
        return torch.cat([x, torch.zeros_like(x)], dim=-2)[..., : x.shape[-2], 0]

    args = dict(x=sliced(kw["u"]), dt=sliced(kw["delta"]), A=kw["A"], B=sliced(kw["B"].to(bc_dtype)),
                C=sliced(kw["C"].to(bc_dtype)), D=kw["D"], z=sliced(kw["z"]), dt_bias=kw["delta_bias"],
                dt_softplus=True, modality=None if M is None else kw["modality"][:, 0].clone())
    assert not args["x"].is_contiguous() and not args["B"].is_contiguous()
    state_ref = kw["initial_state"].clone()
    with torch.no_grad():
        y_ref = naive.selective_state_update(state_ref, **args)
        state = kw["initial_state"].cuda()
        with use_backend("kernel"):
            y = selective_state_update(state, **to_cuda(args))
    assert y.dtype == dtype and state.dtype == state_dtype and y.is_cuda
    tol = TOLERANCES[dtype] if state_dtype == torch.float32 else TOLERANCES[torch.bfloat16]
    assert_close("y", y_ref, y.cpu(), **tol)
    assert_close("state", state_ref, state.cpu(), **tol)


@requires_cuda
@pytest.mark.parametrize("M", [None, 3], ids=lambda m: f"M{m or 0}")
def test_cuda_decode_equals_scan(M):
    """Token-by-token decoding (non-contiguous state) reproduces the scan's outputs and last state."""
    kw = to_cuda(make_inputs(L=23, dim=12, N=4, G=2, M=M))
    with use_backend("kernel"), torch.no_grad():
        out_ref, last_ref = selective_scan(**kw, return_last_state=True)
        state = kw["initial_state"].transpose(1, 2).contiguous().transpose(1, 2)
        ys = [
            selective_state_update(
                state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t], D=kw["D"],
                z=kw["z"][..., t], dt_bias=kw["delta_bias"], dt_softplus=True,
                modality=None if M is None else kw["modality"][:, t],
            )
            for t in range(kw["u"].shape[-1])
        ]
    tol = TOLERANCES[torch.float32]
    assert_close("y", out_ref.cpu(), torch.stack(ys, dim=-1).cpu(), **tol)
    assert_close("state", last_ref.cpu(), state.cpu(), **tol)


@requires_cuda
@pytest.mark.parametrize("full", [False, True], ids=["required_only", "all_optional"])
def test_cuda_opcheck(full):
    kw = make_inputs(L=19, dim=4, N=3, G=2 if full else 1, M=3 if full else None, D=full, z=full,
                     delta_bias=full, delta_softplus=full, initial_state=full)
    kw = to_cuda(kw)
    for name in float_inputs(kw):
        kw[name] = kw[name].requires_grad_()
    torch.library.opcheck(torch.ops.momoe.selective_scan_fwd.default, _op_args(kw))
    out, last, chunk_states = torch.ops.momoe.selective_scan_fwd(*_op_args(kw))
    dlast = torch.randn_like(last) if full else None
    torch.library.opcheck(torch.ops.momoe.selective_scan_bwd.default,
                          (torch.randn_like(out), dlast, *_op_args(kw), chunk_states))
    z = kw["z"][..., 0].detach() if full else None
    step = (torch.randn(2, 4, 3, device="cuda"), kw["u"][..., 0].detach(), kw["delta"][..., 0].detach(),
            kw["A"].detach(), kw["B"][..., 0].detach(), kw["C"][..., 0].detach(),
            kw["D"].detach() if full else None, z, kw["delta_bias"].detach() if full else None, full,
            kw["modality"][:, 0] if full else None)
    torch.library.opcheck(torch.ops.momoe.selective_state_update.default, step)


@requires_cuda
@pytest.mark.parametrize("kw,match", _bad_scan_cases() + [
    pytest.param({**make_inputs(L=9, dim=8, N=4, M=3, G=2), "cpu": "B"}, r"device", id="B_on_cpu"),
])
def test_cuda_bad_inputs(kw, match):
    """The CPU glue's checks and messages on CUDA (modality ids are range-checked on the host)."""
    kw = dict(kw)
    on_cpu = kw.pop("cpu", None)
    gpu = to_cuda(kw)
    if on_cpu is not None:
        gpu[on_cpu] = kw[on_cpu]
    with pytest.raises(ERRORS, match=match):
        torch.ops.momoe.selective_scan_fwd(*_op_args(gpu))


@requires_cuda
@pytest.mark.parametrize("kw,match", _bad_update_cases())
def test_cuda_bad_inputs_state_update(kw, match):
    with pytest.raises(ERRORS, match=match):
        torch.ops.momoe.selective_state_update(*to_cuda(kw).values())


@requires_cuda
def test_cuda_bad_chunk_states():
    kw = to_cuda(make_inputs(L=300, dim=4, N=3, M=3))
    out, last, chunk_states = torch.ops.momoe.selective_scan_fwd(*_op_args(kw))
    for bad in (chunk_states[:, :, :1], chunk_states[..., :-1], chunk_states.double(), chunk_states.cpu()):
        with pytest.raises(ERRORS, match="chunk_states"):
            torch.ops.momoe.selective_scan_bwd(torch.randn_like(out), None, *_op_args(kw), bad)
