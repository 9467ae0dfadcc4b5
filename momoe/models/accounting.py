"""Parameter and FLOPs accounting: total and active parameters per token, training FLOPs per token
for each modality. Computed outside the model classes (from a model, or from a config alone so that
paper-sized cards need no weights).

Conventions: a multiply-add is 2 FLOPs; training FLOPs are 3x the forward FLOPs (forward, and a
backward twice as expensive); embeddings are lookups (0 FLOPs); attention's score and value products
are counted over the average causal context, (seq_len + 1) / 2 keys per query.
"""
import math
from typing import Any, Callable, Dict, Mapping, Union

from torch import nn

from momoe.layers.modality_experts import ModalityExperts
from momoe.layers.routers import AuxRouter
from momoe.models.configuration_utils import ModelConfig
from momoe.models.mamba import MambaConfig
from momoe.models.moma import MoMaConfig
from momoe.models.mor import MoRConfig
from momoe.models.transformer import TransformerConfig


def _modality_rows(module: nn.Module, param: nn.Parameter) -> int:
    """M when the parameter holds one slice per modality (a token uses one of them), else 1."""
    M = getattr(module, "num_modalities", 1)
    return M if M > 1 and param.dim() >= 1 and param.shape[0] == M else 1


def count_parameters(model: nn.Module) -> Dict[str, Any]:
    """{"total": all parameters, "active_per_token": {modality: parameters one token of it uses}}.

    A per-modality parameter (leading dimension = the module's num_modalities) counts one slice per
    token. A MoMa expert bank counts, for a token of modality m, the experts it goes through on average
    (capacity_factor in a routed group, 1 in a single-expert group) and only its own group's router.
    Auxiliary routers (which replace the batch-level routing decisions at inference) are not active.
    Tied parameters count once; the embedding counts fully (a lookup, but the tied LM head uses all of
    it). Depth routing (MoD) changes FLOPs, not the parameters a processed token uses.
    """
    names = list(getattr(getattr(model, "config", None), "modalities", ["all"]))
    seen, total = set(), 0
    inactive = dict.fromkeys(names, 0)
    auxiliary = {id(p) for m in model.modules() if isinstance(m, AuxRouter) for p in m.parameters()}
    for module in model.modules():
        if isinstance(module, ModalityExperts):
            total += _count_experts(module, names, inactive, seen)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            rows = _modality_rows(module, param)
            for name in names:
                inactive[name] += param.numel() if id(param) in auxiliary else param.numel() - param.numel() // rows
    return {"total": total, "active_per_token": {name: total - inactive[name] for name in names}}


def _count_experts(module: ModalityExperts, names, inactive: Dict[str, int], seen: set) -> int:
    bank = [module.experts.w13, module.experts.w2]
    per_expert = sum(p.numel() for p in bank) // module.experts.num_experts
    routers = {n: r.weight.numel() for n, r in module.routers.items()}
    for p in bank + [r.weight for r in module.routers.values()]:
        seen.add(id(p))
    for name, active_experts in zip(module.modality_names, module.active_experts_per_token()):
        if name in inactive:
            unused = per_expert * (module.experts.num_experts - active_experts)
            inactive[name] += round(unused) + sum(v for n, v in routers.items() if n != name)
    return per_expert * module.experts.num_experts + sum(routers.values())


# ---------------------------------------------------------------- FLOPs per token from a config
def _layer_flops(c: TransformerConfig, seq_len: int) -> "tuple[float, float, float]":
    """Forward FLOPs per token of one dense transformer layer: (q/k/v/o projections, attention scores and
    values over the average causal context, SwiGLU FFN)."""
    D = c.d_model
    kv_dim = c.kv_heads * (D // c.n_heads)
    projections = 2 * D * (2 * D + 2 * kv_dim)  # wq, wo and wk, wv
    scores_values = 2 * 2 * D * (seq_len + 1) / 2
    return projections, scores_values, 2 * 3 * D * c.ffn_dim


def _transformer_forward_flops(c: TransformerConfig, seq_len: int, modality: int) -> float:
    D = c.d_model
    projections, scores_values, ffn = _layer_flops(c, seq_len)
    router = 0.0
    if isinstance(c, MoMaConfig):
        experts = c.experts_per_modality[modality]
        if experts > 1:
            ffn *= c.capacity_factor if c.expert_routing == "expert_choice" else c.experts_per_token
            router = 2 * D * experts
    routable = c.mod_modalities is None or c.modalities[modality] in c.mod_modalities
    total = 2 * D * c.vocab_size  # LM head
    for layer in range(c.n_layer):
        if layer in c.mod_layers and routable:
            keep = c.capacity_of(layer)  # processed fraction of this modality's tokens; attention among them only
            total += 2 * D + keep * (projections + ffn + router) + keep * keep * scores_values
        else:
            total += projections + ffn + router + scores_values
    return total


def _mor_forward_flops(c: MoRConfig, seq_len: int, modality: int) -> float:
    """Unique layers for every token; recursion step r of the shared block for the fraction of tokens it
    keeps (expert choice: its capacity; token choice: assumed balanced over the depths, (N_r - r) / N_r).
    Recursion-wise caching attends among the step's tokens only, recursive sharing to every token."""
    D, N_r = c.d_model, c.num_recursions
    projections, scores_values, ffn = _layer_flops(c.layer_config(), seq_len)
    capacities = c.capacities if c.router == "expert-choice" else [(N_r - r) / N_r for r in range(N_r)]
    total = 2 * D * c.vocab_size + c.num_unique_layers * (projections + scores_values + ffn)
    for keep in capacities:
        keys = keep if c.kv_strategy == "recursion-wise" else 1.0
        total += 2 * D + c.recursion_layers * (keep * (projections + ffn) + keep * keys * scores_values)
    return total


def _mamba_forward_flops(c: MambaConfig, seq_len: int, modality: int) -> float:
    D, N = c.d_model, c.d_state
    E, R = c.expand * D, c.dt_rank if c.dt_rank is not None else math.ceil(D / 16)
    per_layer = (2 * D * 2 * E  # in_proj
                 + 2 * E * c.d_conv  # depthwise causal conv
                 + 2 * E * (R + 2 * N)  # x_proj
                 + 2 * R * E  # dt_proj
                 + 9 * E * N  # the scan: discretisation, state update and readout (approximate)
                 + 2 * E * D)  # out_proj
    return c.n_layer * per_layer + 2 * D * c.vocab_size


FORWARD_FLOPS: Dict[type, Callable[[Any, int, int], float]] = {
    TransformerConfig: _transformer_forward_flops,
    MoMaConfig: _transformer_forward_flops,
    MambaConfig: _mamba_forward_flops,
    MoRConfig: _mor_forward_flops,
}


def flops_per_token(config: Union[ModelConfig, str, Mapping[str, Any]], seq_len: int) -> Dict[str, float]:
    """Training FLOPs (forward + backward) per token of each modality at sequence length seq_len.

    config: a config, a card name or a config dict. Example: ``flops_per_token("moma-1.4b-4t4i", 4096)``.
    """
    from momoe.models.registry import config_from_dict, load_card

    if isinstance(config, str):
        config = load_card(config)
    elif isinstance(config, Mapping):
        config = config_from_dict(config)
    if seq_len < 1:
        raise ValueError(f"momoe: seq_len must be >= 1, got {seq_len}")
    forward = FORWARD_FLOPS.get(type(config))
    if forward is None:
        raise ValueError(f"momoe: no FLOPs accounting for {type(config).__name__}")
    return {name: 3.0 * forward(config, seq_len, m) for m, name in enumerate(config.modalities)}
