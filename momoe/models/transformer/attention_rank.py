"""γ-MoD's ARank (Luo et al. 2024, arXiv 2410.13859): the rank of a layer's attention maps tells how
redundant the layer's token mixing is; the layers with the lowest ARank are the ones to turn into
mixture-of-depths layers.

ARank of layer l = the mean over sequences and heads of the numerical rank of the (L, L) causal
attention map (torch.linalg.matrix_rank with relative tolerance `rtol`), measured on a few samples of
data (γ-MoD reports that ~50 samples suffice). The released γ-MoD code ends up converting every layer
but the first three and the last; `choose_mod_layers` picks by ARank instead, optionally keeping the
first and last layers dense.
"""
from typing import List, Optional, Sequence

import torch

from momoe.models.modeling_utils import check_inputs, modality_routing
from momoe.models.registry import upcycle
from momoe.models.transformer.modeling_transformer import TransformerLM


@torch.no_grad()
def attention_rank(model: TransformerLM, input_ids: torch.Tensor, modality_ids: Optional[torch.Tensor] = None,
                   rtol: float = 1e-3) -> List[float]:
    """ARank of every layer of `model` on input_ids, modality_ids: (B, L) -> a list of n_layer floats.
    Every token goes through every layer here (depth routing, if any, is ignored)."""
    modality_ids = check_inputs(input_ids, modality_ids, None)
    routing = modality_routing(modality_ids, model.config.num_modalities, model.sorts_by_modality)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = model.embedding(input_ids)
    ranks = []
    for block in model.layers:
        h = x if block.post_norm else block.attn_norm(x, modality_ids)
        probs = block.attn.attention_probs(h, routing, positions)  # (B, H, L, L)
        ranks.append(torch.linalg.matrix_rank(probs, rtol=rtol).float().mean().item())
        x = block.process(x, modality_ids, routing, positions)
    return ranks


def choose_mod_layers(aranks: Sequence[float], num_mod_layers: int, keep_first: int = 0,
                      keep_last: int = 0) -> List[int]:
    """The `num_mod_layers` layers of lowest ARank (ties: the deeper layer), never among the first
    `keep_first` or last `keep_last` layers; returned in increasing order."""
    n = len(aranks)
    candidates = [i for i in range(keep_first, n - keep_last)]
    if not 0 <= num_mod_layers <= len(candidates):
        raise ValueError(f"momoe: cannot choose {num_mod_layers} MoD layers among {len(candidates)} candidate layers")
    ranked = sorted(candidates, key=lambda i: (aranks[i], -i))
    return sorted(ranked[:num_mod_layers])


def convert_to_mod(dense: TransformerLM, mod_layers: Sequence[int], **mod_fields) -> TransformerLM:
    """A copy of `dense` whose `mod_layers` are depth-routed (fresh routers, every other weight copied),
    e.g. ``convert_to_mod(model, choose_mod_layers(attention_rank(model, ids), 20), mod_capacity=0.5,
    mod_weighting="ffn", mod_shared_router=True, mod_modalities=["image"])`` for γ-MoD."""
    return upcycle(dense, dense.config.replace(mod_layers=list(mod_layers), **mod_fields))
