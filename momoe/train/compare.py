"""Models compared at an equal training-FLOPs budget, and the efficiency measure of MoMa and
Mixture-of-Mamba: how many FLOPs the dense model needs to reach the loss a model reached.

Each model trains for as many updates as the budget buys (FLOPs per update from
momoe.flops_per_token and the data's modality mix) and is evaluated on validation data along the way.
For a model's final loss on a modality, the dense model's validation loss-vs-FLOPs curve is
interpolated (linearly in log FLOPs between the two evaluations around the first crossing); the ratio
of those dense FLOPs to the model's own FLOPs is its efficiency on that modality (2.0: the dense model
needs twice the compute; MoMa reports it as "FLOPs savings", Mixture-of-Mamba as its inverse, the
fraction of the dense model's training FLOPs the model needs for the same loss). A model whose loss the dense curve
never reaches gets a lower bound (the dense run's total over the model's), marked with '>'.
"""
import dataclasses
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from momoe.data import TokenDataset
from momoe.models import build_model, flops_per_token
from momoe.models.configuration_utils import ModelConfig
from momoe.train.config import TrainConfig
from momoe.train.evaluation import evaluate
from momoe.train.plot import plot_curves
from momoe.train.table import format_table
from momoe.train.trainer import Trainer

ALL = "all"  # the loss over every modality's targets, next to the per-modality ones


@dataclasses.dataclass
class Efficiency:
    """Dense FLOPs to reach a loss, over the model's FLOPs; lower_bound: the dense curve never got there."""

    ratio: float
    lower_bound: bool = False

    def __str__(self) -> str:
        return f"{'>' if self.lower_bound else ''}{self.ratio:.2f}x"


@dataclasses.dataclass
class CompareRun:
    """One model's run: its FLOPs per update, updates, validation curve [(FLOPs, {modality or "all": loss})],
    throughput and, after `efficiencies`, its efficiency against the dense model per modality."""

    name: str
    flops_per_step: float
    steps: int
    curve: List[Tuple[float, Dict[str, float]]]
    tokens_per_s: float
    efficiency: Dict[str, Efficiency] = dataclasses.field(default_factory=dict)

    @property
    def flops(self) -> float:
        return self.flops_per_step * self.steps

    @property
    def final(self) -> Dict[str, float]:
        return self.curve[-1][1]


def flops_per_step(config: ModelConfig, train: TrainConfig, mix: Mapping[str, float]) -> float:
    """Training FLOPs of one update: rows_per_step * seq_len tokens, split by the data's modality mix."""
    per_token = flops_per_token(config, train.seq_len)
    return train.rows_per_step * train.seq_len * sum(mix.get(m, 0.0) * per_token[m] for m in config.modalities)


def modality_mix(dataset: TokenDataset) -> Dict[str, float]:
    counts = dataset.tokens_per_modality()
    total = sum(counts.values())
    return {name: c / total for name, c in counts.items()}


def dense_flops_to_reach(curve: Sequence[Tuple[float, float]], target: float) -> Optional[float]:
    """FLOPs at which a loss curve [(FLOPs, loss)] first reaches `target` (log-linear interpolation
    between the evaluations around the crossing), or None when it never does."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            f0, l0 = previous
            t = (l0 - target) / (l0 - loss)
            return math.exp(math.log(f0) + t * (math.log(flops) - math.log(f0)))
        previous = (flops, loss)
    return None


def efficiencies(dense: CompareRun, run: CompareRun) -> Dict[str, Efficiency]:
    """Per modality (and "all"): the dense FLOPs to reach run's final loss over run's FLOPs."""
    out = {}
    for key, target in run.final.items():
        curve = [(f, losses[key]) for f, losses in dense.curve if key in losses]
        needed = dense_flops_to_reach(curve, target)
        out[key] = Efficiency(dense.flops / run.flops, True) if needed is None else Efficiency(needed / run.flops)
    return out


def compare_models(configs: Mapping[str, ModelConfig], train_data: TokenDataset, validation: TokenDataset,
                   base: TrainConfig, budget: float, dense: Optional[str] = None, evaluations: int = 8,
                   eval_batches: int = 4, progress: bool = True) -> List[CompareRun]:
    """Train every model of `configs` with `budget` training FLOPs (settings of `base`, steps from the
    budget), evaluating `evaluations` times on up to eval_batches validation batches; then the
    efficiency of each against `dense` (default: the first model). Models start from base.seed."""
    if not configs:
        raise ValueError("momoe: compare needs at least one model")
    dense = dense or next(iter(configs))
    if dense not in configs:
        raise ValueError(f"momoe: the dense baseline {dense!r} is not among the models {list(configs)}")
    mix = modality_mix(train_data)
    runs = []
    for name, config in configs.items():
        per_step = flops_per_step(config, base, mix)
        steps = int(budget // per_step)
        if steps < 1:
            raise ValueError(f"momoe: a budget of {budget:.3g} FLOPs buys no update of {name} "
                             f"({per_step:.3g} FLOPs each)")
        torch.manual_seed(base.seed)
        model = build_model(config)
        run = CompareRun(name, per_step, steps, [], 0.0)
        checkpoints = {max(1, round(steps * k / evaluations)) for k in range(1, evaluations + 1)}

        def on_step(trainer: Trainer, record: Dict, run: CompareRun = run) -> None:
            if trainer.step in checkpoints:
                result = evaluate(trainer.model, validation, base.batch_size, base.seq_len, max_batches=eval_batches)
                run.curve.append((trainer.step * run.flops_per_step, {**result.loss_per_modality, ALL: result.loss}))
            run.tokens_per_s = trainer.tokens_seen / trainer.elapsed

        Trainer(model, train_data, base.replace(steps=steps, warmup=None), name=name, progress=progress).fit(on_step)
        runs.append(run)
    reference = runs[list(configs).index(dense)]
    for run in runs:
        run.efficiency = efficiencies(reference, run)
    return runs


def format_comparison(runs: Sequence[CompareRun], dense: str) -> str:
    keys = list(runs[0].final)
    headers = ["model", "updates", "train FLOPs", "tokens/s"] + [f"{k} loss" for k in keys] + \
              [f"{k} vs {dense}" for k in keys]
    rows = [[r.name, r.steps, r.flops, round(r.tokens_per_s)] + [r.final.get(k) for k in keys] +
            [str(r.efficiency[k]) if k in r.efficiency else None for k in keys] for r in runs]
    return format_table(headers, rows)


def save_comparison(runs: Sequence[CompareRun], out_dir: str) -> Optional[str]:
    """compare.json (every number) and compare.png (validation loss vs FLOPs per modality; None
    without matplotlib). Returns the plot's path."""
    os.makedirs(out_dir, exist_ok=True)
    data = [{**dataclasses.asdict(r), "efficiency": {k: dataclasses.asdict(e) for k, e in r.efficiency.items()}}
            for r in runs]
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(data, f, indent=2)
    return plot_curves({r.name: r.curve for r in runs}, os.path.join(out_dir, "compare.png"),
                       xlabel="training FLOPs", title="validation loss at equal FLOPs", log_x=True)
