"""Linear model merging, and the data-mixture search built on it.

Linear merging: theta = sum_i w_i theta_i over checkpoints of one architecture (same config, same
tensors). Mixture search ("Linear Model Merging Unlocks Simple and Scalable Multimodal Data Mixture
Optimization", 2025): given one model trained on each data domain (from a common start), the model
merged with weights w approximates the model trained on the mixture w of the domains; so scoring
merged models over a grid of mixture weights on a validation set ranks the mixtures without training
on any of them, and the best-scoring weights are the predicted best mixture.
"""
import dataclasses
import itertools
import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from momoe.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_json, load_weights
from momoe.models import build_model, config_from_dict
from momoe.models.configuration_utils import ModelConfig
from momoe.models.modeling_utils import PreTrainedModel
from momoe.train.checkpointing import resolve_checkpoint

State = Dict[str, torch.Tensor]


def load_checkpoints(paths: Sequence[str]) -> Tuple[ModelConfig, List[State]]:
    """The shared config and the weights of several checkpoints (model or run folders); checkpoints of
    different architectures raise ValueError naming the differing config fields."""
    if len(paths) < 2:
        raise ValueError(f"momoe: merging needs at least two checkpoints, got {len(paths)}")
    folders = [resolve_checkpoint(p) for p in paths]
    configs = [{k: v for k, v in load_json(os.path.join(f, CONFIG_NAME)).items() if k != "momoe_version"}
               for f in folders]
    for path, config in zip(paths[1:], configs[1:]):
        differ = sorted(k for k in set(config) | set(configs[0]) if config.get(k) != configs[0].get(k))
        if differ:
            raise ValueError(f"momoe: cannot merge {paths[0]} and {path}: different architectures (config fields "
                             f"{differ} differ)")
    return config_from_dict(configs[0]), [load_weights(os.path.join(f, WEIGHTS_NAME)) for f in folders]


def linear_merge(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_i weights[i] * states[i], tensor by tensor (accumulated in fp32 or wider, cast back to each
    tensor's dtype). Every state must hold the same names, shapes and dtypes."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"momoe: one weight per checkpoint: {len(states)} checkpoints, {len(weights)} weights")
    reference = states[0]
    for i, state in enumerate(states[1:], 1):
        if set(state) != set(reference):
            raise ValueError(f"momoe: checkpoint {i} holds other tensors than checkpoint 0: "
                             f"{sorted(set(state) ^ set(reference))[:5]}")
        bad = [n for n, t in state.items() if t.shape != reference[n].shape or t.dtype != reference[n].dtype]
        if bad:
            raise ValueError(f"momoe: checkpoint {i} has other shapes or dtypes than checkpoint 0 for {bad[:5]}")
    merged = {}
    for name, ref in reference.items():
        acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        acc = torch.zeros(ref.shape, dtype=acc_dtype)
        for state, w in zip(states, weights):
            acc += float(w) * state[name].to(acc_dtype)
        merged[name] = acc.to(ref.dtype)
    return merged


def merged_model(config: ModelConfig, state: State) -> PreTrainedModel:
    model = build_model(config)
    model.load_checked_state_dict(state, source="merged checkpoints")
    return model


def simplex_grid(num_domains: int, resolution: int) -> List[Tuple[float, ...]]:
    """Every mixture whose weights are multiples of 1/resolution summing to 1 (C(resolution + k - 1, k - 1)
    points for k domains), e.g. simplex_grid(2, 4) = [(0, 1), (0.25, 0.75), ..., (1, 0)]."""
    if num_domains < 1 or resolution < 1:
        raise ValueError(f"momoe: a simplex grid needs num_domains >= 1 and resolution >= 1, got "
                         f"{num_domains} and {resolution}")
    points = []
    for cuts in itertools.combinations(range(resolution + num_domains - 1), num_domains - 1):
        bounds = (-1,) + cuts + (resolution + num_domains - 1,)
        points.append(tuple((bounds[i + 1] - bounds[i] - 1) / resolution for i in range(num_domains)))
    return points


@dataclasses.dataclass
class MixtureScore:
    weights: Tuple[float, ...]
    score: float
    details: Dict[str, float]


def mixture_search(states: Sequence[State], score: Callable[[State], Tuple[float, Dict[str, float]]],
                   resolution: int = 4) -> List[MixtureScore]:
    """Score the model merged with each mixture of simplex_grid(len(states), resolution); score(state)
    returns (a number, lower is better, e.g. a validation loss; details). Returns the scores best first:
    the first one is the predicted best data mixture."""
    results = []
    for weights in simplex_grid(len(states), resolution):
        value, details = score(linear_merge(states, weights))
        results.append(MixtureScore(weights, value, details))
    return sorted(results, key=lambda r: r.score)
