"""`momoe demo` (the README's `make demo`): a tiny dense transformer, MoMa and Mixture-of-Mamba trained on
the embedded tri-modal dataset, compared, plotted, and asked to draw a digit.

Steps: (1) load the builtin dataset; (2) train each model for the same number of updates on the same
batches (progress bars show the loss per modality and tokens/s; each run folder gets a JSONL log, a
loss plot and a checkpoint); (3) evaluate on the validation split and print a table of per-modality
losses and throughput; (4) plot every run's per-modality training curves in one PNG; (5) continue the
prompt "<caption> <boi>" with the model that has the lowest validation image loss and write the image
as PNG. Sized for a few minutes on 2 CPU cores.
"""
import os
import time
from typing import Dict, List, Optional

import torch

from momoe.data import load_dataset, load_tokenizer
from momoe.models import build_model, count_parameters, from_pretrained
from momoe.train import (
    TrainConfig,
    Trainer,
    continue_document,
    evaluate,
    family_config,
    parse_prompt,
    save_continuation,
)
from momoe.train.checkpointing import resolve_checkpoint
from momoe.train.plot import MISSING, log_curves, plot_curves
from momoe.train.table import format_table

# run name -> (family, what it is)
MODELS = {
    "dense": ("transformer", "dense early-fusion transformer (Chameleon-style)"),
    "moma": ("moma", "MoMa, 2 experts per modality, expert choice"),
    "mixture-of-mamba": ("mom-mamba", "Mixture-of-Mamba, per-modality in/x/dt/out projections"),
}
SIZES = dict(d_model=96, n_layer=3, n_heads=4, experts=2)
TRAIN = TrainConfig(steps=300, batch_size=8, seq_len=128, lr=4e-3, warmup=20, log_interval=1)
PROMPT = "a handwritten seven"
STAGES = 5


def stage(index: int, text: str) -> None:
    print(f"\n[{index}/{STAGES}] {text}", flush=True)


def main(out_dir: str = os.path.join("runs", "demo"), steps: Optional[int] = None, generate: bool = True) -> None:
    config = TRAIN if steps is None else TRAIN.replace(steps=steps, warmup=None)
    stage(1, "the builtin dataset: 8x8 digits, their descriptions, and those spoken (tokenized)")
    train, validation = load_dataset("builtin", "train"), load_dataset("builtin", "validation")
    counts = train.tokens_per_modality()
    print(f"train: {len(train):,} documents, " + ", ".join(f"{n:,} {m}" for m, n in counts.items()) + " tokens; "
          f"validation: {len(validation):,} documents; vocabulary {train.vocab.size} ids")

    stage(2, f"training {len(MODELS)} models for {config.steps} updates each ({config.batch_size} x "
             f"{config.seq_len} tokens per update, {torch.get_num_threads()} threads)")
    rows: List[list] = []
    curves: Dict[str, list] = {}
    image_losses: Dict[str, float] = {}
    for name, (family, description) in MODELS.items():
        print(f"{name}: {description}")
        torch.manual_seed(config.seed)
        model = build_model(family_config(family, train.vocab, **SIZES))
        trainer = Trainer(model, train, config.replace(train_aux_routers=family == "moma"),
                          out_dir=os.path.join(out_dir, name), name=name)
        start = time.perf_counter()
        records = trainer.fit()
        seconds = time.perf_counter() - start
        result = evaluate(model, validation, config.batch_size, config.seq_len)
        curves[name] = log_curves(records)
        image_losses[name] = result.loss_per_modality.get("image", float("inf"))
        params = count_parameters(model)
        rows.append([name, params["total"], params["active_per_token"]["text"]]
                    + [result.loss_per_modality.get(m) for m in train.vocab.names]
                    + [result.loss, round(trainer.tokens_seen / trainer.elapsed), round(seconds, 1)])

    stage(3, "validation loss per modality (the whole validation split)")
    print(format_table(["model", "params", "active/token"] + [f"{m} loss" for m in train.vocab.names]
                       + ["all", "tokens/s", "seconds"], rows))

    stage(4, "training loss curves")
    plot = plot_curves(curves, os.path.join(out_dir, "loss.png"), title="training loss per modality")
    print(f"wrote {plot}" if plot else f"momoe: {MISSING}")

    if not generate:
        return
    best = min(image_losses, key=image_losses.get)
    stage(5, f"{best} (lowest image loss) draws '{PROMPT}'")
    tokenizer = load_tokenizer("builtin")
    model = from_pretrained(resolve_checkpoint(os.path.join(out_dir, best)))
    prompt = parse_prompt([f"text:{PROMPT}"], tokenizer, then="image")
    image_codes = tokenizer.tokenizer("image").codes_per_image
    ids = continue_document(model, tokenizer, prompt, max_new_tokens=image_codes + 1, temperature=0.0)
    transcript, files = save_continuation(ids, len(prompt), tokenizer, os.path.join(out_dir, "generated"))
    print(transcript)
    print(f"\ncheckpoints: {out_dir}/<model>/ (latest.json -> checkpoints/step-*); try\n"
          f"  momoe generate {os.path.join(out_dir, best)} --prompt 'text:the digit 3' --then image --out "
          f"{os.path.join(out_dir, 'generated')}\n  momoe eval {os.path.join(out_dir, best)}\n"
          f"  momoe info {os.path.join(out_dir, best)}")
