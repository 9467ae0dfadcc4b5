"""GPU microbenchmarks of the momoe ops against the baselines, side by side in one run (CUDA events).

Targets (issue 4, bf16 on an H100-class GPU):
  grouped GEMM at T=32768, K=2048, N=5632, 8 experts (balanced; skewed with an empty expert), forward
    and forward+backward: >= 90% of the TFLOP/s of one dense torch.mm of equal FLOPs, >= torch._grouped_mm,
    >= 1.3x a per-expert loop
  gather / scatter: >= 80% of the bandwidth of a device copy (y.copy_(x))

Prints one table per op family and, with --json, writes them with the device, date and command. Without
a GPU it prints why and writes only the environment (so it still runs on a CPU machine).

    python -m benchmarks.bench_ops_cuda [--only gemm,permute] [--json benchmarks/results/bench_ops_cuda.json]
"""
import argparse
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch

import momoe.ops as ops
from benchmarks.bench_ops import split_sizes
from benchmarks.common import environment, print_environment, print_table, save_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_time(fn: Callable[[], object], warmup: int = 3, repeat: int = 20) -> float:
    """Median GPU time of fn() in seconds, each call timed between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cuda_time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 2, **kwargs) -> Dict[str, float]:
    """cuda_time() of each function, taking turns over `rounds` rounds; the best round of each is kept."""
    best: Dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best.get(name, float("inf")), cuda_time(fn, **kwargs))
    return best


# ----------------------------------------------------------------------------- grouped GEMM
def grouped_gemm_impls(w: torch.Tensor, sizes: torch.Tensor) -> Dict[str, Tuple[Callable, torch.Tensor]]:
    """Each implementation as (fn(x, weight) -> y, its weight) for one split of the rows of x (T, K) over
    w (G, K, N); `sizes` on the host. The dense baseline multiplies all T rows by one (K, N) matrix (the
    same FLOPs); torch._grouped_mm gets the K-major copy of w that its kernels prefer."""
    bounds = [0] + sizes.cumsum(0).tolist()
    sizes_dev = sizes.to(w.device)
    offs = sizes.cumsum(0).to(device=w.device, dtype=torch.int32)

    def loop(x, w):
        return torch.cat([x[bounds[g] : bounds[g + 1]] @ w[g] for g in range(w.shape[0])])

    impls = {
        "dense torch.mm": (lambda x, w: x @ w, w[0].clone()),
        "per-expert loop": (loop, w),
        "momoe grouped_gemm": (lambda x, w: ops.grouped_gemm(x, w, sizes_dev), w),
    }
    if hasattr(torch, "_grouped_mm"):
        w_k_major = w.transpose(1, 2).contiguous().transpose(1, 2)
        impls["torch._grouped_mm"] = (lambda x, w: torch._grouped_mm(x, w, offs=offs), w_k_major)
    return impls


def forward_backward(fn: Callable, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """A call of fn(x, w) followed by the backward pass for dx and dw."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()

    def run():
        torch.autograd.grad(fn(x, w), (x, w), dy)

    return run


def gemm_rows(name: str, dtype: str, split: str, phase: str, t: Optional[float], flops: float) -> Dict[str, object]:
    if t is None:
        return {"dtype": dtype, "split": split, "phase": phase, "impl": name, "ms": "n/a", "TFLOP/s": "n/a"}
    return {"dtype": dtype, "split": split, "phase": phase, "impl": name, "ms": t * 1e3, "TFLOP/s": flops / t / 1e12}


def gemm_verdict(timings: Dict[str, Optional[float]]) -> str:
    """PASS when momoe reaches 90% of dense, matches torch._grouped_mm and beats the loop by 1.3x."""
    ours, dense, loop = timings["momoe grouped_gemm"], timings["dense torch.mm"], timings["per-expert loop"]
    grouped = timings.get("torch._grouped_mm")
    ok = ours <= dense / 0.9 and ours * 1.3 <= loop and (grouped is None or ours <= grouped)
    return "PASS" if ok else "MISS"


def time_gemm(name: str, call: Callable[[], object], repeat: int) -> Optional[float]:
    """cuda_time(call); None for torch._grouped_mm where this torch, GPU or dtype does not support it."""
    if name != "torch._grouped_mm":
        return cuda_time(call, repeat=repeat)
    try:
        return cuda_time(call, repeat=repeat)
    except (RuntimeError, NotImplementedError) as error:
        print(f"torch._grouped_mm: not measured ({str(error).splitlines()[0]})")
        return None


def bench_grouped_gemm(args) -> List[Dict[str, object]]:
    T, K, N, G = args.gemm_tokens, args.gemm_k, args.gemm_n, args.experts
    rows: List[Dict[str, object]] = []
    for dname, dtype in DTYPES.items():
        x = torch.randn(T, K, device="cuda", dtype=dtype)
        w = (torch.randn(G, K, N, device="cuda") / K**0.5).to(dtype)
        dy = torch.randn(T, N, device="cuda", dtype=dtype)
        flops = 2.0 * T * K * N
        for split in ("balanced", "skewed"):
            impls = grouped_gemm_impls(w, split_sizes(T, G, split == "skewed"))
            for phase, factor in (("fwd", 1.0), ("fwd+bwd", 3.0)):
                timings: Dict[str, Optional[float]] = {}
                for name, (fn, weight) in impls.items():
                    if phase == "fwd":
                        call = lambda fn=fn, weight=weight: fn(x, weight)  # noqa: E731
                    else:
                        call = forward_backward(fn, x, weight, dy)
                    timings[name] = time_gemm(name, call, args.repeat)
                for name, t in timings.items():
                    rows.append(gemm_rows(name, dname, split, phase, t, factor * flops))
                rows.append({"dtype": dname, "split": split, "phase": phase,
                             "impl": "target: >=0.9x dense, >=_grouped_mm, >=1.3x loop", "ms": "",
                             "TFLOP/s": gemm_verdict(timings)})
    cols = ["dtype", "split", "phase", "impl", "ms", "TFLOP/s"]
    print_table(f"grouped GEMM (CUDA): T={T} K={K} N={N} G={G}; fwd+bwd counts 3x the forward FLOPs", cols, rows)
    return rows


# ----------------------------------------------------------------------------- permutation
def verdict(name: str, ok: bool) -> str:
    """PASS / MISS for momoe's rows; baselines have no target."""
    return ("PASS" if ok else "MISS") if name.startswith("momoe") else ""


def bench_permute(args) -> List[Dict[str, object]]:
    """Top-k dispatch (gather) and weighted combine (scatter) against a device copy of the same rows."""
    T, D, k, E = args.permute_tokens, args.permute_dim, 2, args.experts
    rows: List[Dict[str, object]] = []
    for dname, dtype in DTYPES.items():
        x = torch.randn(T, D, device="cuda", dtype=dtype)
        expert_ids = torch.randint(0, E, (T, k), device="cuda")
        order, _ = ops.sort_by_group(expert_ids, E)
        token = order // k
        gates = torch.rand(T * k, device="cuda", dtype=dtype)
        xs = ops.gather_rows(x, token)
        R, elem = xs.shape[0], x.element_size()
        copy_dst = torch.empty_like(xs)

        def index_add():
            return torch.zeros(T, D, device="cuda", dtype=dtype).index_add_(0, token, xs * gates[:, None])

        # Bytes each op must move: the copy reads and writes R rows; the gather reads R rows and writes R;
        # the combine reads R rows and writes T.
        cases = [
            ("copy", "y.copy_(x), R rows", lambda: copy_dst.copy_(xs), 2 * R * D * elem),
            ("gather", "momoe gather_rows", lambda: ops.gather_rows(x, token), 2 * R * D * elem),
            ("gather", "torch.index_select", lambda: x.index_select(0, token), 2 * R * D * elem),
            ("scatter", "momoe scatter_rows (weighted)", lambda: ops.scatter_rows(xs, token, T, weight=gates),
             (R + T) * D * elem),
            ("scatter", "zeros + index_add_ (weighted, atomics)", index_add, (R + T) * D * elem),
        ]
        timings = cuda_time_interleaved({name: fn for _, name, fn, _ in cases}, repeat=args.repeat)
        copy_bandwidth = cases[0][3] / timings[cases[0][1]]
        for op, name, _, moved in cases:
            bandwidth = moved / timings[name]
            rows.append({"dtype": dname, "op": op, "impl": name, "ms": timings[name] * 1e3, "GB/s": bandwidth / 1e9,
                         "% of copy GB/s": 100.0 * bandwidth / copy_bandwidth,
                         "target": verdict(name, bandwidth >= 0.8 * copy_bandwidth)})
        sort_times = cuda_time_interleaved({
            "momoe sort_by_group": lambda: ops.sort_by_group(expert_ids, E),
            "torch.sort(stable) + bincount": lambda: (torch.sort(expert_ids.flatten(), stable=True),
                                                      torch.bincount(expert_ids.flatten(), minlength=E)),
        }, repeat=args.repeat)
        for name, t in sort_times.items():
            rows.append({"dtype": dname, "op": "sort", "impl": name, "ms": t * 1e3})
    cols = ["dtype", "op", "impl", "ms", "GB/s", "% of copy GB/s", "target"]
    print_table(f"permutation (CUDA): T={T} tokens, D={D}, top-{k} of {E} experts (R={T * k} rows); "
                "target: momoe >= 80% of copy GB/s", cols, rows)
    return rows


BENCHES = {"gemm": bench_grouped_gemm, "permute": bench_permute}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--json", default=None, help="write the tables to this JSON file")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--gemm-tokens", type=int, default=32768)
    parser.add_argument("--gemm-k", type=int, default=2048)
    parser.add_argument("--gemm-n", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--permute-tokens", type=int, default=32768)
    parser.add_argument("--permute-dim", type=int, default=2048)
    args = parser.parse_args()
    env = environment()
    results: Dict[str, object] = {"environment": env}
    if not torch.cuda.is_available():
        print_environment(env)
        print("no CUDA device: nothing to measure (the CUDA rows need a GPU)")
    else:
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        print_environment(env)
        torch.manual_seed(0)
        for name in args.only.split(","):
            results[name] = BENCHES[name](args)
    save_results(args.json, results)


if __name__ == "__main__":
    main()
