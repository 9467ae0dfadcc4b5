"""MoMa: modality-aware mixture of experts for early-fusion pre-training (Lin et al. 2024,
arXiv 2407.21770).

The transformer of `momoe.models.transformer` (attention shared by all modalities, or per modality with
`modality_split`) whose FFN is `ModalityExperts`: one group of experts per modality, expert-choice
routing inside each group, all groups run as one expert bank on grouped GEMMs. Mixture-of-depths
layers (`mod_layers`) combine with it as in the paper's MoD variants.

Causal inference (§2.4): the expert-choice decisions need the whole batch, so the auxiliary routers
(one per expert, and the MoD predictors) are trained afterwards with the main model frozen
(`freeze_for_aux_router_training`, then ``model(..., train_aux_routers=True).aux_loss``) and decide on
their own when decoding (`causal_routing=True`, always with a cache).

Sparse upcycling (§2.5): `upcycle_from` starts every expert of a group from the FFN it replaces
(the dense FFN, or the group's single expert of a 1t1i MoMa); the routers start fresh.
"""
from typing import List, Optional

import torch
from torch import nn

from momoe.layers.modality_experts import ModalityExperts
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.routers import RoutingContext
from momoe.models.modeling_utils import PreTrainedModel
from momoe.models.moma.configuration_moma import MoMaConfig
from momoe.models.transformer.modeling_transformer import TransformerBlock, TransformerLM


class MoMaBlock(TransformerBlock):
    """A transformer block whose FFN is a ModalityExperts layer (it takes the routing context)."""

    def feed_forward(self, h: torch.Tensor, routing: Optional[ModalityRouting],
                     ctx: Optional[RoutingContext]) -> torch.Tensor:
        return self.ffn(h, routing, ctx, name=f"{self.name}.experts")


class MoMaLM(TransformerLM):
    """Decoder-only LM over interleaved modalities with modality-aware expert-choice MoE FFNs."""

    config_class = MoMaConfig
    block_class = MoMaBlock

    @property
    def sorts_by_modality(self) -> bool:
        return True  # the expert groups are per modality even when attention is shared

    def build_ffn(self, index: int) -> nn.Module:
        c = self.config
        return ModalityExperts(c.d_model, c.ffn_dim, c.experts_per_modality, c.modalities,
                               capacity_factor=c.capacity_factor, aux_hidden=c.aux_router_hidden,
                               gumbel_noise=c.router_gumbel_noise, routing=c.expert_routing,
                               top_k=c.experts_per_token)

    def ffn_output_weight(self, ffn: nn.Module) -> torch.Tensor:
        return ffn.experts.w2

    def aux_router_parameters(self) -> List[nn.Parameter]:
        """The auxiliary routers' and MoD predictors' parameters (trained in the second stage)."""
        return [p for name, p in self.named_parameters() if ".aux_router." in name or ".predictor." in name]

    def freeze_for_aux_router_training(self) -> List[nn.Parameter]:
        """requires_grad only on the auxiliary routers (MoMa §2.4's second stage); returns them."""
        aux = self.aux_router_parameters()
        keep = {id(p) for p in aux}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return aux

    @torch.no_grad()
    def upcycle_from(self, source: PreTrainedModel) -> None:
        """Copy a dense TransformerLM's (or a MoMa with fewer experts per group) weights into this model:
        every expert of group m starts as the source's FFN for modality m (the dense FFN, a per-modality
        FFN, or one expert of the source's group, cycling when the source group has several); every
        other weight is copied as is; routers and auxiliary routers keep their fresh initialisation."""
        if getattr(source.config, "modalities", None) != self.config.modalities:
            raise ValueError(f"momoe: cannot upcycle: source modalities {getattr(source.config, 'modalities', None)} "
                             f"differ from {self.config.modalities}")
        src_state, dst_state = source.state_dict(), self.state_dict()
        for name, dst in dst_state.items():
            if ".ffn.routers." in name:
                continue  # expert-choice routers start fresh
            if ".ffn.experts." in name:
                self._copy_expert_weights(name, dst, src_state, source)
                continue
            src = src_state.get(name)
            if src is None:
                if ".router." in name:
                    continue  # a MoD router the source does not have
                raise ValueError(f"momoe: cannot upcycle: the source model has no {name}")
            if src.shape == dst.shape:
                dst.copy_(src)
            elif src.dim() == dst.dim() and src.shape[0] == 1 and src.shape[1:] == dst.shape[1:]:
                dst.copy_(src.expand_as(dst))
            else:
                raise ValueError(f"momoe: cannot upcycle {name}: source shape {tuple(src.shape)}, "
                                 f"target shape {tuple(dst.shape)}")

    def _copy_expert_weights(self, name: str, dst: torch.Tensor, src_state, source: PreTrainedModel) -> None:
        """dst: experts.w13 (E, 2F, D) or experts.w2 (E, D, F) of this model, filled group by group."""
        prefix, kind = name.rsplit(".ffn.experts.", 1)  # kind: "w13" or "w2"
        if f"{prefix}.ffn.experts.{kind}" in src_state:  # a MoMa source: its groups' experts
            src_groups = source.config.experts_per_modality
            per_group = torch.split(src_state[f"{prefix}.ffn.experts.{kind}"], src_groups)
        else:  # a dense / MoT source: SwiGLU ModalityLinear weights (M or 1, out, in)
            weight = src_state.get(f"{prefix}.ffn.{kind}.weight")
            if weight is None:
                raise ValueError(f"momoe: cannot upcycle: the source model has no FFN at {prefix}.ffn")
            per_group = [weight[m if weight.shape[0] > 1 else 0][None] for m in range(self.config.num_modalities)]
        start = 0
        for group, e_m in zip(per_group, self.config.experts_per_modality):
            if group.shape[1:] != dst.shape[1:]:
                raise ValueError(f"momoe: cannot upcycle {name}: expert shape {tuple(group.shape[1:])}, "
                                 f"target {tuple(dst.shape[1:])}")
            index = torch.arange(e_m) % group.shape[0]
            dst[start:start + e_m].copy_(group[index])
            start += e_m
