"""Mixture-of-Mamba against a dense Mamba of equal active FLOPs on the CPU, side by side in one run.

Training step (forward, backward, AdamW) tokens/s, and decoding tokens/s with the step() path.
Both models have the same d_model and depth; the Mixture-of-Mamba splits in_proj, x_proj, dt_proj
and out_proj over three modalities, so each token does the dense model's FLOPs. Target (issue 7):
Mixture-of-Mamba step time <= 1.15x the dense step time.

    python -m benchmarks.bench_mamba [--d-model 512 --n-layer 4 --batch 4 --seqlen 512] [--json PATH]
"""
import argparse
from typing import Dict, List

import torch

import momoe
from benchmarks.common import (add_model_arguments, interleaved_batch, measure_interleaved, print_table, run_benchmark,
                               train_step_fn)
from momoe.models import MambaConfig

SPLIT = ["in_proj", "x_proj", "dt_proj", "out_proj"]


def models(args) -> Dict[str, torch.nn.Module]:
    base = dict(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.n_layer,
                modalities=["text", "image", "speech"])
    torch.manual_seed(0)
    return {
        "dense Mamba": momoe.build_model(MambaConfig(**base)),
        "Mixture-of-Mamba": momoe.build_model(MambaConfig(split=SPLIT, **base)),
    }


def decode_fn(model: torch.nn.Module, ids: torch.Tensor, mod: torch.Tensor, tokens: int):
    """A 16-token prefill, then `tokens` greedy step() calls (each sequence keeps its last modality)."""

    def decode():
        with torch.no_grad():
            cache = model(ids[:, :16], mod[:, :16], return_cache=True).cache
        tok, m = ids[:, 15], mod[:, 15]
        for _ in range(tokens):
            tok = model.step(tok, m, cache).argmax(-1)

    return decode


def bench(args) -> List[Dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    ids, mod = interleaved_batch(args.batch, args.seqlen, args.vocab, gen)
    built = models(args)
    train = measure_interleaved({name: train_step_fn(m, ids, mod) for name, m in built.items()},
                                warmup=2, repeat=args.repeat)
    B = args.decode_batch
    decode = measure_interleaved({name: decode_fn(m, ids[:B], mod[:B], args.decode_tokens)
                                  for name, m in built.items()}, warmup=1, repeat=3)
    rows = []
    for name, model in built.items():
        counts = momoe.count_parameters(model)
        rows.append({
            "model": name, "params": counts["total"], "active": counts["active_per_token"]["text"],
            "train step ms": train[name] * 1e3, "train tokens/s": ids.numel() / train[name],
            "decode tokens/s": B * args.decode_tokens / decode[name],
        })
    ratio = train["Mixture-of-Mamba"] / train["dense Mamba"]
    rows.append({"model": "MoM / dense step time", "train step ms": ratio,
                 "train tokens/s": "target <= 1.15x: " + ("PASS" if ratio <= 1.15 else "MISS")})
    cols = ["model", "params", "active", "train step ms", "train tokens/s", "decode tokens/s"]
    print_table(f"Mamba training step and decoding: d_model={args.d_model} n_layer={args.n_layer} "
                f"batch={args.batch} seqlen={args.seqlen} vocab={args.vocab}; decode batch {args.decode_batch} "
                f"(a decoding batch with several modalities reads each one's projection weights)", cols, rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32)
    run_benchmark("mamba", bench, parser.parse_args())


if __name__ == "__main__":
    main()
