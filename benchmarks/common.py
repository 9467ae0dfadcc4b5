"""Timing, tables and JSON output shared by the benchmark scripts."""
import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from momoe.train.optim import adamw


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, as a caching allocator (jemalloc, tcmalloc, CUDA's) does.

    By default glibc returns every block above 32 MiB to the kernel when it is freed, so the next large
    output is fresh memory whose first touch costs a page fault and a page clear per 4 KiB; whether an
    allocation hits that path depends on the state of the heap, which made timings of ops returning
    large tensors swing by 2x from run to run. With mmap disabled and trimming off, every implementation
    in the table reuses warm memory and the timings measure the kernels. Returns False where this is
    not glibc (nothing changes then).
    """
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def measure(fn: Callable[[], object], warmup: int = 2, repeat: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of `fn()` in seconds (after `warmup` calls; at least `repeat` runs or `min_time` s)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 2, **kwargs) -> Dict[str, float]:
    """measure() of each function, the functions taking turns over `rounds` rounds and the best round
    kept for each: a slow spell of a shared machine then lands on no single side of a comparison."""
    best: Dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best.get(name, float("inf")), measure(fn, **kwargs))
    return best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, object]:
    """What the numbers were measured on."""
    return {
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def print_environment(env: Dict[str, object]) -> None:
    """The environment as the first line of a benchmark's output."""
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Dict[str, object]]) -> None:
    """Print `rows` (dicts keyed by `columns`) as an aligned text table."""

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def write_json(path: str, results: Dict[str, object]) -> None:
    """Write results atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_results(path: Optional[str], results: Dict[str, object]) -> None:
    """write_json(path, results) and say so; nothing without a path (no --json)."""
    if path:
        write_json(path, results)
        print(f"\nwrote {path}")


def interleaved_batch(B: int, L: int, vocab: int, gen: torch.Generator,
                      num_modalities: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and modality ids with spans of 32-256 tokens of each modality (text, image,
    speech), as in interleaved data."""
    mod = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        t = 0
        while t < L:
            span = int(torch.randint(32, 257, (1,), generator=gen))
            mod[b, t : t + span] = int(torch.randint(0, num_modalities, (1,), generator=gen))
            t += span
    ids = torch.randint(0, vocab, (B, L), generator=gen)
    return ids, mod


def train_step_fn(model: torch.nn.Module, ids: torch.Tensor, mod: torch.Tensor, optimizer: bool = True):
    """One optimizer step: forward, backward, AdamW (fused where torch can, as a user would run it);
    optimizer=False: forward and backward only (what the model costs, without the update of every parameter)."""
    opt = adamw(model.parameters(), lr=1e-4)

    def step():
        loss = model(ids, mod, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer:
            opt.step()

    return step


def add_model_arguments(parser: "argparse.ArgumentParser", d_model: int = 512, n_layer: int = 4, vocab: int = 4096,
                        batch: int = 4, seqlen: int = 512, repeat: int = 5) -> None:
    """The model-size, batch and output flags shared by the model benchmarks."""
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--n-layer", type=int, default=n_layer)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seqlen", type=int, default=seqlen)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--json", default=None, help="also write the results (and the environment) to this file")


def run_benchmark(key: str, bench: Callable[[object], List[Dict[str, object]]], args, keep_memory: bool = True) -> None:
    """Print the environment, run bench(args) (which prints its table) and write the JSON if asked."""
    if keep_memory:
        keep_freed_memory()
    env = environment()
    print_environment(env)
    save_results(args.json, {"environment": env, key: bench(args)})
