"""AdamW for a model, and its state as tensors + JSON (safetensors-friendly, no pickle)."""
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from momoe.checkpoint import CheckpointError
from momoe.train.config import TrainConfig

STATE_PREFIX = "optimizer."


def adamw(params: Iterable[Any], **hyperparameters: Any) -> torch.optim.AdamW:
    """torch's AdamW over `params` (parameters or param groups) in the fastest implementation it offers
    for them: fused (one kernel per step) where supported, else the default; per parameter when FSDP2's
    DTensors and plain tensors mix (FSDP2 beside expert-parallel banks), which the list kernels refuse."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if len({isinstance(p, DTensor) for p in tensors}) > 1:
        return torch.optim.AdamW(params, foreach=False, **hyperparameters)
    try:
        return torch.optim.AdamW(params, fused=True, **hyperparameters)
    except (RuntimeError, ValueError):  # fused needs floating-point parameters on a supported device
        return torch.optim.AdamW(params, **hyperparameters)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (`adamw`) over the trainable parameters: weight decay on matrices (dim >= 2), none on norms,
    biases and other vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("momoe: the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return adamw([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def optimizer_state(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split optimizer.state_dict() into tensors {"optimizer.<param index>.<name>": Tensor} and a JSON
    dict (param groups, non-tensor per-parameter values)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{STATE_PREFIX}{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                         meta: Dict[str, Any], source: str) -> None:
    """Inverse of optimizer_state; a state for other parameters raises CheckpointError."""
    try:
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
        scalars = meta["scalars"]
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"momoe: {source}: malformed optimizer state ({error!r})") from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param: Dict[int, Dict[str, Any]] = {}
    for key, value in list(tensors.items()) + [(STATE_PREFIX + k, v) for k, v in scalars.items()]:
        index, _, name = key[len(STATE_PREFIX):].partition(".")
        if not key.startswith(STATE_PREFIX) or not index.isdigit() or int(index) >= len(params):
            raise CheckpointError(f"momoe: {source}: optimizer entry {key!r} does not belong to this model's "
                                  f"{len(params)} parameters")
        per_param.setdefault(int(index), {})[name] = value
    for index, values in per_param.items():
        for name, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                raise CheckpointError(f"momoe: {source}: optimizer {name} of parameter {index} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}")
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"momoe: {source}: the optimizer state does not match the model ({error})") from None
