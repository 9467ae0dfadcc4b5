"""CUDA selective scan and decode step, side by side with mamba-ssm's kernels (issue 5's targets).

Shape (from the issue): bf16, batch 8, dim 2048, L 2048, N 16, with D, z, delta_bias and softplus, in
mamba-ssm's (batch, dim, L) layout. Times are medians of CUDA-event timings of whole calls (autograd
and argument checks included, as a model sees them). Targets:
  single-modality forward and forward+backward  <= 1.05x mamba-ssm's selective_scan_fn
  3-modality split                              <= 1.10x our single-modality time
  decode step at batch 64                       <= mamba-ssm's selective_state_update
The split is measured with modality runs of 64-1024 tokens (an interleaved document: most 256-step
chunks hold one modality) and, as the worst case, with a random modality per token.

    python -m benchmarks.bench_scan_cuda [--json benchmarks/results/bench_scan_cuda_h100.json]

Without CUDA it says so and exits 0. mamba-ssm columns are empty when mamba_ssm does not import.
"""
import argparse
import statistics
from typing import Callable, Dict, List, Optional

import torch

import momoe.ops as ops
from benchmarks.bench_ops import fwd_bwd, scan_inputs
from benchmarks.common import environment, print_environment, print_table, save_results


def cuda_time(fn: Callable[[], object], warmup: int, repeat: int) -> float:
    """Median time of fn() in milliseconds, each call between two CUDA events."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def modality_runs(batch: int, L: int, modalities: int, seed: int = 0) -> torch.Tensor:
    """(batch, L) modality ids in runs of 64 to 1024 tokens, cycling through the modalities."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids: List[int] = []
        m = int(torch.randint(0, modalities, (1,), generator=gen))
        while len(ids) < L:
            ids += [m] * int(torch.randint(64, 1025, (1,), generator=gen))
            m = (m + 1) % modalities
        rows.append(torch.tensor(ids[:L]))
    return torch.stack(rows)


def mamba_kernels() -> Dict[str, Optional[Callable]]:
    """mamba-ssm's selective_scan_fn and selective_state_update, or None for each that does not import."""
    found: Dict[str, Optional[Callable]] = {"scan": None, "step": None}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        found["scan"] = selective_scan_fn
    except ImportError:
        pass
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        found["step"] = selective_state_update
    except ImportError:
        pass
    return found


def on_cuda(inputs: Dict[str, object]) -> Dict[str, object]:
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def row(case: str, ours: float, theirs: Optional[float], baseline: str, target: float) -> Dict[str, object]:
    """A table row: our time against a baseline time (mamba-ssm's or ours), with the target ratio."""
    out: Dict[str, object] = {"case": case, "ours ms": ours, "baseline": baseline, "target": f"<= {target:.2f}x"}
    if theirs is not None:
        ratio = ours / theirs
        out.update({"baseline ms": theirs, "ratio": ratio, "ok": "PASS" if ratio <= target else "MISS"})
    return out


def bench_scan(args, mamba) -> List[Dict[str, object]]:
    batch, dim, L, N = args.batch, args.dim, args.len, args.state
    single = on_cuda(scan_inputs(batch, dim, L, N, 1, torch.bfloat16))
    split = on_cuda(scan_inputs(batch, dim, L, N, 3, torch.bfloat16))
    split_runs = {**split, "modality": modality_runs(batch, L, 3).cuda()}
    time = lambda fn: cuda_time(fn, args.warmup, args.repeat)  # noqa: E731
    rows = []
    ours_fwd = time(lambda: ops.selective_scan(**single))
    ours_bwd = time(fwd_bwd(ops.selective_scan, single))
    theirs_fwd = time(lambda: mamba["scan"](**single)) if mamba["scan"] else None
    theirs_bwd = time(fwd_bwd(mamba["scan"], single)) if mamba["scan"] else None
    rows.append(row("forward, 1 modality", ours_fwd, theirs_fwd, "mamba-ssm", 1.05))
    rows.append(row("fwd+bwd, 1 modality", ours_bwd, theirs_bwd, "mamba-ssm", 1.05))
    for name, inputs in (("runs", split_runs), ("per-token", split)):
        rows.append(row(f"forward, 3 modalities ({name})", time(lambda: ops.selective_scan(**inputs)), ours_fwd,
                        "ours, 1 modality", 1.10))
        rows.append(row(f"fwd+bwd, 3 modalities ({name})", time(fwd_bwd(ops.selective_scan, inputs)), ours_bwd,
                        "ours, 1 modality", 1.10))
    return rows


def bench_step(args, mamba) -> List[Dict[str, object]]:
    batch, dim, N = args.decode_batch, args.dim, args.state
    dtype = torch.bfloat16
    step = dict(
        x=torch.randn(batch, dim, dtype=dtype), dt=torch.randn(batch, dim, dtype=dtype) * 0.5 - 1.0,
        A=-torch.rand(dim, N).add(0.5), B=torch.randn(batch, N, dtype=dtype), C=torch.randn(batch, N, dtype=dtype),
        D=torch.randn(dim), z=torch.randn(batch, dim, dtype=dtype), dt_bias=torch.randn(dim) * 0.1,
        dt_softplus=True,
    )
    step = on_cuda(step)
    state = torch.randn(batch, dim, N, device="cuda")
    time = lambda fn: cuda_time(fn, args.warmup, args.repeat)  # noqa: E731
    with torch.no_grad():
        ours = time(lambda: ops.selective_state_update(state, **step))
        theirs = time(lambda: mamba["step"](state, **step)) if mamba["step"] else None
    return [row(f"decode step, batch {batch}", ours, theirs, "mamba-ssm", 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the table to this JSON file")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--len", type=int, default=2048)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is unavailable: nothing to measure (bench_scan_cuda times the CUDA kernels).")
        return
    torch.manual_seed(0)
    env = environment()
    env["device"] = torch.cuda.get_device_name()
    env["cuda"] = torch.version.cuda
    mamba = mamba_kernels()
    env["mamba_ssm"] = "found" if all(mamba.values()) else "missing (baseline columns empty)"
    print_environment(env)
    rows = bench_scan(args, mamba) + bench_step(args, mamba)
    cols = ["case", "ours ms", "baseline", "baseline ms", "ratio", "target", "ok"]
    print_table(f"selective scan on CUDA: bf16, batch={args.batch} dim={args.dim} L={args.len} N={args.state} "
                "(D, z, delta_bias, softplus)", cols, rows)
    save_results(args.json, {"environment": env, "scan": rows})


if __name__ == "__main__":
    main()
