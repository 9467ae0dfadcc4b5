"""Transformer-family training steps on the CPU, side by side in one run: dense early fusion,
Mixture-of-Transformers, MoMa (1t1i, 4t4i; expert choice in modality groups on grouped GEMMs), MoMa
with mixture-of-depths, a dense MoD transformer, and Mixture-of-Recursions (one shared middle layer,
expert-choice recursion depths).

All models share d_model, depth and heads; a MoMa expert has the dense FFN's size and capacity factor 1,
so MoMa 4t4i does the dense model's FLOPs per token (plus its routers). Columns: training FLOPs per
token (momoe.flops_per_token, text), step time and the achieved GFLOP/s. Target (issue 6): MoMa 4t4i
step time <= 1.15x the dense model's.

    python -m benchmarks.bench_models [--d-model 512 --n-layer 4 --batch 4 --seqlen 512] [--json PATH]
"""
import argparse
from typing import Dict, List

import torch

import momoe
from benchmarks.common import (add_model_arguments, interleaved_batch, measure_interleaved, print_table, run_benchmark,
                               train_step_fn)
from momoe.models import MoMaConfig, MoRConfig, TransformerConfig

MODALITIES = ["text", "image", "speech"]


def configs(args) -> Dict[str, TransformerConfig]:
    base = dict(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.n_layer, n_heads=args.d_model // 64,
                modalities=MODALITIES)
    every_other = list(range(1, args.n_layer, 2))
    return {
        "dense": TransformerConfig(**base),
        "MoT": TransformerConfig(modality_split=True, **base),
        "MoMa 1t1i1s": MoMaConfig(experts_per_modality=[1, 1, 1], **base),
        "MoMa 4t4i4s": MoMaConfig(experts_per_modality=[4, 4, 4], **base),
        "MoMa 4t4i4s + MoD": MoMaConfig(experts_per_modality=[4, 4, 4], mod_layers=every_other,
                                        mod_capacity=args.mod_capacity, **base),
        "dense + MoD": TransformerConfig(mod_layers=every_other, mod_capacity=args.mod_capacity, **base),
        # the first and last layer, and one shared layer applied n_layer - 2 times (at least twice;
        # capacities (N - r) / N)
        "MoR": MoRConfig(num_recursions=max(2, args.n_layer - 2), recursion_layers=1, n_kv_heads=None, d_ff=None,
                         tie_embeddings=False, **{k: v for k, v in base.items() if k != "n_layer"}),
    }


def bench(args) -> List[Dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    ids, mod = interleaved_batch(args.batch, args.seqlen, args.vocab, gen, num_modalities=len(MODALITIES))
    cfgs = configs(args)
    torch.manual_seed(0)
    built = {name: momoe.build_model(cfg) for name, cfg in cfgs.items()}
    train = measure_interleaved({name: train_step_fn(m, ids, mod) for name, m in built.items()},
                                warmup=2, repeat=args.repeat)
    fwd_bwd = measure_interleaved({name: train_step_fn(m, ids, mod, optimizer=False) for name, m in built.items()},
                                  warmup=1, repeat=args.repeat)
    rows = []
    for name, model in built.items():
        counts = momoe.count_parameters(model)
        flops = momoe.flops_per_token(cfgs[name], args.seqlen)["text"]
        rows.append({
            "model": name, "params": counts["total"], "active (text)": counts["active_per_token"]["text"],
            "train MFLOP/token": flops / 1e6, "fwd+bwd ms": fwd_bwd[name] * 1e3, "step ms": train[name] * 1e3,
            "tokens/s": ids.numel() / train[name], "GFLOP/s": flops * ids.numel() / train[name] / 1e9,
        })
    ratio, model_ratio = train["MoMa 4t4i4s"] / train["dense"], fwd_bwd["MoMa 4t4i4s"] / fwd_bwd["dense"]
    rows.append({"model": "MoMa 4t4i4s / dense", "fwd+bwd ms": model_ratio, "step ms": ratio,
                 "tokens/s": "target <= 1.15x: " + ("PASS" if ratio <= 1.15 else "MISS")})
    cols = ["model", "params", "active (text)", "train MFLOP/token", "fwd+bwd ms", "step ms", "tokens/s", "GFLOP/s"]
    print_table(f"Transformer family training step (forward, backward, AdamW over all parameters): "
                f"d_model={args.d_model} n_layer={args.n_layer} batch={args.batch} seqlen={args.seqlen} "
                f"vocab={args.vocab}; MoD every other layer at capacity {args.mod_capacity}. The step's AdamW "
                f"update touches every parameter (MoMa 4t4i4s has 7x the dense model's), the fwd+bwd column "
                f"does not", cols, rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--mod-capacity", type=float, default=0.125)
    run_benchmark("models", bench, parser.parse_args())


if __name__ == "__main__":
    main()
