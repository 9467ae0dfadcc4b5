"""Training throughput of a small MoMa on 1 process vs 2 processes on the CPU (gloo), and the all_to_all
traffic of expert parallelism.

Every process trains on its own batch of `--batch` x `--seqlen` tokens (weak scaling: the global batch
grows with the processes), so tokens/s counts the tokens of all processes per step. The 1-process run
gets all the threads, each of the 2 processes half of them (`--threads`, default: the CPU cores).
Strategies with 2 processes: DDP, FSDP2 and expert parallelism (each rank holds half of the experts of
every modality group, expert choice over both ranks' tokens, the rest DDP, or FSDP2 in "FSDP2 + EP").
"a2a MB/step" is what one rank sends to the other through all_to_all in a step (dispatch and combine,
forward and backward).

    python -m benchmarks.bench_distributed [--d-model 256 --n-layer 4 --batch 4 --seqlen 256] [--json PATH]
"""
import argparse
import os
from typing import Dict, List

import torch
import torch.distributed as dist

import momoe
from benchmarks.common import add_model_arguments, interleaved_batch, measure, print_table, run_benchmark, train_step_fn
from momoe.distributed import init_mesh, spawn, unwrap_model, wrap_model
from momoe.distributed.expert_parallel import expert_parallel_modules
from momoe.models import MoMaConfig

MODALITIES = ["text", "image", "speech"]
# (name, processes, strategy, ep size)
RUNS = [("1 process", 1, None, 1), ("2 processes DDP", 2, "ddp", 1), ("2 processes FSDP2", 2, "fsdp", 1),
        ("2 processes EP", 2, "ep", 2), ("2 processes FSDP2 + EP", 2, "fsdp", 2)]


def config(args) -> MoMaConfig:
    return MoMaConfig(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.n_layer,
                      n_heads=max(1, args.d_model // 64), modalities=MODALITIES,
                      experts_per_modality=[args.experts] * len(MODALITIES))


def run_rank(args, strategy, ep_size) -> Dict[str, float]:
    """On every rank: the median training step time, and the all_to_all bytes this rank sends per step."""
    torch.manual_seed(0)
    model = momoe.build_model(config(args))
    if strategy is not None:
        model = wrap_model(model, strategy, init_mesh(ep_size=ep_size))
    rank = dist.get_rank() if dist.is_initialized() else 0
    ids, mod = interleaved_batch(args.batch, args.seqlen, args.vocab, torch.Generator().manual_seed(rank),
                                 num_modalities=len(MODALITIES))
    step = train_step_fn(model, ids, mod)
    seconds = measure(step, warmup=1, repeat=args.repeat)
    banks = [bank for _, bank in expert_parallel_modules(unwrap_model(model))]
    for bank in banks:
        bank.sent_bytes = 0
    step()
    sent = 2 * sum(bank.sent_bytes for bank in banks)  # the backward sends what the forward sent
    return {"seconds": seconds, "tokens": ids.numel(), "a2a_bytes": sent}


def bench(args) -> List[Dict[str, object]]:
    rows = []
    base = None
    for name, nprocs, strategy, ep_size in RUNS:
        ranks = spawn(run_rank, nprocs, args=(args, strategy, ep_size), threads=max(1, args.threads // nprocs))
        seconds = max(r["seconds"] for r in ranks)
        tokens_per_s = sum(r["tokens"] for r in ranks) / seconds
        base = base or tokens_per_s
        rows.append({"run": name, "threads/process": max(1, args.threads // nprocs), "step ms": seconds * 1e3,
                     "tokens/s": tokens_per_s, "vs 1 process": tokens_per_s / base,
                     "a2a MB/step/rank": max(r["a2a_bytes"] for r in ranks) / 1e6})
    cfg = config(args)
    print_table(f"MoMa {cfg.experts_per_modality} training step (forward, backward, AdamW) per process: "
                f"batch={args.batch} seqlen={args.seqlen} d_model={args.d_model} n_layer={args.n_layer} "
                f"vocab={args.vocab}; gloo on the CPU",
                ["run", "threads/process", "step ms", "tokens/s", "vs 1 process", "a2a MB/step/rank"], rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, d_model=256, seqlen=256)
    parser.add_argument("--experts", type=int, default=4, help="experts per modality group (even: EP over 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    run_benchmark("distributed", bench, parser.parse_args(), keep_memory=False)


if __name__ == "__main__":
    main()
