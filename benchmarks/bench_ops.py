"""Microbenchmarks of the momoe ops against the baselines a user would otherwise use.

Measured side by side in one run; prints one table per op family and, with --json, writes
them with the machine, date and command. Targets (2-core CPU, from the foundation issue):
  grouped GEMM   >= 0.95x dense torch.mm of equal FLOPs; >= torch._grouped_mm and a per-group loop
  gather/scatter >= 70% of the bandwidth of a plain copy of the same bytes; faster than
                 index_select / index_add_
  selective scan forward >= 40x the pure-PyTorch reference, forward+backward >= 20x its autograd,
                 3-modality split <= 1.1x the single-modality scan

    python -m benchmarks.bench_ops [--only gemm,permute,scan] [--json benchmarks/results/x.json]
"""
import argparse
from typing import Dict, List

import torch

import momoe.ops as ops
from benchmarks.common import (environment, keep_freed_memory, measure, measure_interleaved, print_environment,
                               print_table, save_results)
from momoe.ops.selective_scan import naive as scan_naive

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- grouped GEMM
def split_sizes(total: int, groups: int, skewed: bool) -> torch.Tensor:
    """Balanced sizes, or a skewed split: half the rows in group 0, group 1 empty, the rest even."""
    if not skewed:
        return torch.full((groups,), total // groups, dtype=torch.int64)
    sizes = torch.zeros(groups, dtype=torch.int64)
    sizes[0] = total // 2
    rest = total - sizes[0].item()
    sizes[2:] = rest // (groups - 2)
    sizes[-1] += rest - sizes[2:].sum()
    return sizes


def random_splits(total: int, groups: int, seed: int):
    """An endless stream of routing splits that change every call, as in training: Dirichlet(0.5)
    expert popularity, then multinomial token counts (empty groups happen)."""
    gen = torch.Generator().manual_seed(seed)
    concentration = torch.full((groups,), 0.5)
    while True:
        probs = torch._sample_dirichlet(concentration, generator=gen)
        yield torch.multinomial(probs, total, replacement=True, generator=gen).bincount(minlength=groups)


def grouped_gemm_impls(x: torch.Tensor, w: torch.Tensor) -> Dict[str, object]:
    """Each grouped GEMM implementation as fn(sizes) -> y."""

    def loop(sizes):
        bounds = [0] + sizes.cumsum(0).tolist()
        return torch.cat([x[bounds[g] : bounds[g + 1]] @ w[g] for g in range(w.shape[0])])

    return {
        "per-group loop": loop,
        "torch._grouped_mm": lambda sizes: torch._grouped_mm(x, w, offs=sizes.cumsum(0).to(torch.int32)),
        "momoe grouped_gemm": lambda sizes: ops.grouped_gemm(x, w, sizes),
    }


def bench_grouped_gemm(args) -> List[Dict[str, object]]:
    """Fixed splits (balanced; skewed with an empty group), and a split that changes at every call
    after a warm-up of 100 calls (training: oneDNN's bf16 GEMMs generate a kernel per new row count,
    which momoe bounds by rounding row counts to a multiple of 32)."""
    T, K, N, G = args.gemm_tokens, 1024, 2816, 8
    rows = []
    for dname, dtype in DTYPES.items():
        x = torch.randn(T, K, dtype=dtype)
        w = torch.randn(G, K, N, dtype=dtype) / K**0.5
        w_dense = w[0].clone()
        flops = 2.0 * T * K * N
        impls = grouped_gemm_impls(x, w)
        for split in ("balanced", "skewed", "changing"):
            calls = {"dense torch.mm": lambda: torch.mm(x, w_dense)}
            for seed, (name, fn) in enumerate(impls.items()):
                if split == "changing":
                    # A stream of its own for each implementation: oneDNN's kernel cache is shared, so
                    # the same splits would let a later implementation reuse an earlier one's kernels.
                    stream = random_splits(T, G, seed=seed)
                    for _ in range(100):
                        fn(next(stream))
                    calls[name] = lambda fn=fn, stream=stream: fn(next(stream))
                else:
                    sizes = split_sizes(T, G, split == "skewed")
                    calls[name] = lambda fn=fn, sizes=sizes: fn(sizes)
            timings = measure_interleaved(calls, repeat=args.repeat)
            t_dense = timings["dense torch.mm"]
            ours = timings["momoe grouped_gemm"]
            for name, t in timings.items():
                rows.append({
                    "dtype": dname, "split": split, "impl": name, "ms": t * 1e3,
                    "TFLOP/s": flops / t / 1e12, "ours vs this": t / ours,
                })
            rows.append({
                "dtype": dname, "split": split, "impl": "target: >=0.95x dense, >= others",
                "ms": "", "TFLOP/s": "",
                "ours vs this": "PASS" if ours <= t_dense / 0.95 and ours <= min(
                    timings["per-group loop"], timings["torch._grouped_mm"]) * 1.02 else "MISS",
            })
    cols = ["dtype", "split", "impl", "ms", "TFLOP/s", "ours vs this"]
    print_table(f"grouped GEMM forward: T={T} K={K} N={N} G={G}  ('ours vs this' = this time / ours)", cols, rows)
    return rows


# ----------------------------------------------------------------------------- permutation
def bench_permute(args) -> List[Dict[str, object]]:
    T, D, k = args.permute_tokens, 2048, 2
    rows = []
    for dname, dtype in DTYPES.items():
        x = torch.randn(T, D, dtype=dtype)
        expert_ids = torch.randint(0, 8, (T, k))
        order, _ = ops.sort_by_group(expert_ids, 8)
        token_of_row = order // k
        gates = torch.rand(T * k, dtype=dtype)
        xs = ops.gather_rows(x, token_of_row)
        R = xs.shape[0]
        copy_src = torch.randn(R, D, dtype=dtype)
        copy_dst = torch.empty_like(copy_src)
        moved = 2.0 * R * D * x.element_size()  # bytes read + written by a copy of the gathered rows
        t_copy = measure(lambda: copy_dst.copy_(copy_src), repeat=args.repeat)

        def index_add():
            out = torch.zeros(T, D, dtype=dtype)
            return out.index_add_(0, token_of_row, xs * gates[:, None])

        cases = {
            ("gather", "tensor copy (same bytes)"): t_copy,
            ("gather", "torch.index_select"): measure(lambda: x.index_select(0, token_of_row), repeat=args.repeat),
            ("gather", "momoe gather_rows"): measure(lambda: ops.gather_rows(x, token_of_row), repeat=args.repeat),
            ("scatter", "tensor copy (same bytes)"): t_copy,
            ("scatter", "zeros + index_add_ (weighted)"): measure(index_add, repeat=args.repeat),
            ("scatter", "momoe scatter_rows (weighted)"): measure(
                lambda: ops.scatter_rows(xs, token_of_row, T, weight=gates), repeat=args.repeat),
        }
        for (op, name), t in cases.items():
            rows.append({"dtype": dname, "op": op, "impl": name, "ms": t * 1e3, "GB/s": moved / t / 1e9,
                         "% of copy": 100.0 * t_copy / t})
        rows.append({"dtype": dname, "op": "sort_by_group", "impl": "momoe sort_by_group",
                     "ms": measure(lambda: ops.sort_by_group(expert_ids, 8), repeat=args.repeat) * 1e3,
                     "GB/s": "", "% of copy": ""})
        rows.append({"dtype": dname, "op": "sort_by_group", "impl": "torch.sort(stable)",
                     "ms": measure(lambda: torch.sort(expert_ids.flatten(), stable=True), repeat=args.repeat) * 1e3,
                     "GB/s": "", "% of copy": ""})
    cols = ["dtype", "op", "impl", "ms", "GB/s", "% of copy"]
    print_table(f"permutation: T={T} tokens, D={D}, top-{k} of 8 experts (R={T * k} rows)", cols, rows)
    return rows


# ----------------------------------------------------------------------------- selective scan
def scan_inputs(batch: int, dim: int, L: int, N: int, modalities: int, dtype: torch.dtype) -> Dict[str, object]:
    """Mamba's configuration: D skip, z gate, delta bias and softplus; per-modality A/D/bias when M > 1."""
    lead = (modalities,) if modalities > 1 else ()
    inputs = dict(
        u=torch.randn(batch, dim, L, dtype=dtype),
        delta=torch.randn(batch, dim, L, dtype=dtype) * 0.5 - 1.0,
        A=-torch.rand(*lead, dim, N).add(0.5),
        B=torch.randn(batch, N, L),
        C=torch.randn(batch, N, L),
        D=torch.randn(*lead, dim),
        z=torch.randn(batch, dim, L, dtype=dtype),
        delta_bias=torch.randn(*lead, dim) * 0.1,
        delta_softplus=True,
    )
    if modalities > 1:
        inputs["modality"] = torch.randint(0, modalities, (batch, L))
    return inputs


def fwd_bwd(fn, inputs: Dict[str, object]):
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    args = {**inputs, **leaves}

    def run():
        out = fn(**args)
        torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))

    return run


def bench_scan(args) -> List[Dict[str, object]]:
    batch, dim, L, N = 2, args.scan_dim, args.scan_len, 16
    rows = []
    for dname, dtype in DTYPES.items():
        single = scan_inputs(batch, dim, L, N, 1, dtype)
        split = scan_inputs(batch, dim, L, N, 3, dtype)
        t = {
            "ref fwd": measure(lambda: scan_naive.selective_scan(**single), warmup=1, repeat=args.ref_repeat),
            "ref fwd+bwd": measure(fwd_bwd(scan_naive.selective_scan, single), warmup=1, repeat=args.ref_repeat),
        }
        ours = {
            "ours fwd": lambda: ops.selective_scan(**single),
            "ours fwd M=3": lambda: ops.selective_scan(**split),
            "ours fwd+bwd": fwd_bwd(ops.selective_scan, single),
            "ours fwd+bwd M=3": fwd_bwd(ops.selective_scan, split),
        }
        t.update(measure_interleaved(ours, repeat=args.repeat))
        checks = [
            ("forward", "ref fwd", "ours fwd", "speed-up vs reference", t["ref fwd"] / t["ours fwd"], ">= 40x", 40.0),
            ("fwd+bwd", "ref fwd+bwd", "ours fwd+bwd", "speed-up vs reference autograd",
             t["ref fwd+bwd"] / t["ours fwd+bwd"], ">= 20x", 20.0),
        ]
        for phase, ref_key, ours_key, what, ratio, target, bound in checks:
            rows.append({"dtype": dname, "phase": phase, "reference ms": t[ref_key] * 1e3,
                         "ours ms": t[ours_key] * 1e3, "ours M=3 ms": t[ours_key + " M=3"] * 1e3,
                         "metric": what, "value": ratio, "target": target,
                         "ok": "PASS" if ratio >= bound else "MISS"})
            cost = t[ours_key + " M=3"] / t[ours_key]
            rows.append({"dtype": dname, "phase": phase, "metric": "M=3 / single-modality time", "value": cost,
                         "target": "<= 1.1x", "ok": "PASS" if cost <= 1.1 else "MISS"})
    cols = ["dtype", "phase", "reference ms", "ours ms", "ours M=3 ms", "metric", "value", "target", "ok"]
    print_table(f"selective scan: batch={batch} dim={dim} L={L} N={N} (D, z, delta_bias, softplus)", cols, rows)
    return rows


BENCHES = {"gemm": bench_grouped_gemm, "permute": bench_permute, "scan": bench_scan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--json", default=None, help="write the tables to this JSON file")
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep",
                        help="keep: glibc keeps freed memory (steady state, no page faults of fresh outputs in "
                             "any timing; see benchmarks/common.py); system: glibc's defaults")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ref-repeat", type=int, default=3, help="runs of the slow pure-PyTorch scan reference")
    parser.add_argument("--gemm-tokens", type=int, default=8192)
    parser.add_argument("--permute-tokens", type=int, default=16384)
    parser.add_argument("--scan-dim", type=int, default=1536)
    parser.add_argument("--scan-len", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    env = environment()
    env["allocator"] = "glibc keeps freed memory" if args.allocator == "keep" and keep_freed_memory() else "system"
    print_environment(env)
    results: Dict[str, object] = {"environment": env}
    with torch.inference_mode(False):
        for name in args.only.split(","):
            results[name] = BENCHES[name](args)
    save_results(args.json, results)


if __name__ == "__main__":
    main()
