"""Training, evaluation, generation, merging and comparisons of momoe models on token datasets.

API overview (the `momoe` command line is a thin layer over these)::

    from momoe.data import load_dataset, load_tokenizer
    from momoe.train import TrainConfig, Trainer, evaluate, continue_document, family_config

    data = load_dataset("builtin", "train")
    model = momoe.build_model(family_config("moma", data.vocab, d_model=128, n_layer=4))
    trainer = Trainer(model, data, TrainConfig(steps=200, batch_size=8, seq_len=256), out_dir="runs/moma")
    trainer.fit()                     # progress bar, runs/moma/log.jsonl, loss.png, checkpoints/
    Trainer(model, data, TrainConfig(steps=200, ...), out_dir="runs/moma").resume()   # continue exactly
    evaluate(model, load_dataset("builtin", "validation")).loss_per_modality

- `config` TrainConfig; `schedule` warmup + cosine; `optim` AdamW and its state as tensors + JSON;
  `rng` generator states; `checkpointing` atomic training checkpoints and run folders; `log` JSONL;
  `metrics` per-modality loss tallies; `trainer` the loop; `evaluation` loss and perplexity;
  `generation` constrained mixed-modal continuation, PNG/WAV output; `png` stdlib PNG files;
  `plot` loss curves (matplotlib, optional); `specs` model configs from cards, files or families;
  `info` parameters and FLOPs; `merging` linear merges and the data-mixture search; `compare`
  equal-FLOPs comparisons and the dense-FLOPs efficiency; `table` text tables; `parallel` the trainer
  under torchrun (`start_parallel`, DDP / FSDP2 / expert parallelism, distributed checkpoints).
"""
from momoe.train.checkpointing import latest_checkpoint, resolve_checkpoint
from momoe.train.compare import compare_models, dense_flops_to_reach
from momoe.train.config import TrainConfig
from momoe.train.evaluation import EvalResult, evaluate
from momoe.train.generation import SpanGrammar, continue_document, parse_prompt, save_continuation
from momoe.train.info import model_info
from momoe.train.merging import linear_merge, load_checkpoints, mixture_search, simplex_grid
from momoe.train.parallel import Parallel, start_parallel, stop_parallel
from momoe.train.schedule import WarmupCosine
from momoe.train.specs import FAMILIES, family_config, fit_to_vocab, load_model_config
from momoe.train.trainer import Trainer

__all__ = [
    "FAMILIES",
    "EvalResult",
    "Parallel",
    "SpanGrammar",
    "TrainConfig",
    "Trainer",
    "WarmupCosine",
    "compare_models",
    "continue_document",
    "dense_flops_to_reach",
    "evaluate",
    "family_config",
    "fit_to_vocab",
    "latest_checkpoint",
    "linear_merge",
    "load_checkpoints",
    "load_model_config",
    "mixture_search",
    "model_info",
    "parse_prompt",
    "resolve_checkpoint",
    "save_continuation",
    "simplex_grid",
    "start_parallel",
    "stop_parallel",
]
