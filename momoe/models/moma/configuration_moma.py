"""Configuration of MoMa: an early-fusion transformer with modality-aware mixture-of-experts FFNs."""
import dataclasses
from typing import List, Optional

from momoe.layers.modality_experts import EXPERT_ROUTINGS
from momoe.models.transformer.configuration_transformer import TransformerConfig


@dataclasses.dataclass
class MoMaConfig(TransformerConfig):
    """MoMa (Lin et al. 2024, arXiv 2407.21770): the dense early-fusion transformer of `TransformerConfig`
    whose FFNs become modality-specific groups of experts with expert-choice routing inside each group.

    experts_per_modality: experts of each modality's group, aligned with `modalities` (``[4, 4]`` with
    modalities ``["text", "image"]`` is the paper's 4t4i; ``[1, 1]`` its 1t1i, modality-specific FFNs).
    Every expert has the dense FFN's size (`d_ff`). capacity_factor: each expert of a group of E_m
    experts takes ``ceil(capacity_factor * T_m / E_m)`` of the group's T_m tokens in the batch.
    aux_router_hidden: hidden units of the auxiliary routers for causal inference (None: d_model / 2, as in MoMa).
    router_gumbel_noise: Gumbel-sigmoid noise on the router logits in training.
    expert_routing: "expert_choice" (MoMa) or "token_choice" (top-`experts_per_token` softmax routing
    inside each group, with the Switch load-balancing and ST-MoE z losses in aux_loss; causal as it is).
    The MoD fields of `TransformerConfig` (`mod_layers`, ...) add mixture-of-depths on top (MoMa + MoD).
    """

    model_type = "moma"

    experts_per_modality: List[int] = dataclasses.field(default_factory=lambda: [4, 4, 4])
    capacity_factor: float = 1.0
    aux_router_hidden: Optional[int] = None
    router_gumbel_noise: bool = False
    expert_routing: str = "expert_choice"
    experts_per_token: int = 1

    def validate(self) -> None:
        super().validate()
        self.experts_per_modality = list(self.experts_per_modality)
        if len(self.experts_per_modality) != self.num_modalities:
            raise ValueError(f"momoe: experts_per_modality {self.experts_per_modality} needs one entry per "
                             f"modality {self.modalities}")
        if any(e < 1 for e in self.experts_per_modality):
            raise ValueError(f"momoe: every modality needs at least one expert, got {self.experts_per_modality}")
        most = min((e for e in self.experts_per_modality if e > 1), default=None)
        if most is not None and not 0 < self.capacity_factor <= most:
            raise ValueError(f"momoe: capacity_factor must be in (0, {most}] (an expert takes at most all of "
                             f"its group's tokens), got {self.capacity_factor}")
        if self.expert_routing not in EXPERT_ROUTINGS:
            raise ValueError(f"momoe: unknown expert_routing {self.expert_routing!r}; choose one of {EXPERT_ROUTINGS}")
        if most is not None and not 1 <= self.experts_per_token <= most:
            raise ValueError(f"momoe: experts_per_token must be in [1, {most}] (the smallest routed group), "
                             f"got {self.experts_per_token}")
        if self.aux_router_hidden is not None and self.aux_router_hidden < 1:
            raise ValueError(f"momoe: aux_router_hidden must be >= 1 or None, got {self.aux_router_hidden}")

    @property
    def num_experts(self) -> int:
        return sum(self.experts_per_modality)
