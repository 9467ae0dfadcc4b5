"""Configuration of Mamba language models, dense or Mixture-of-Mamba."""
import dataclasses
from typing import List, Optional

from momoe.layers.mamba import SPLITTABLE_PROJECTIONS
from momoe.models.configuration_utils import ModelConfig


@dataclasses.dataclass
class MambaConfig(ModelConfig):
    """A Mamba LM over one token space shared by every modality (early fusion).

    `split` lists the projections that get one weight per modality (Mixture-of-Mamba splits all four:
    in_proj, x_proj, dt_proj, out_proj); empty for a dense Mamba. `split_ssm` also gives each modality
    its own A, D and dt bias. `modalities` names the modality ids of the data (0, 1, ...).
    """

    model_type = "mamba"

    vocab_size: int = 65536
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None  # None: ceil(d_model / 16), as mamba-ssm's "auto"
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    modalities: List[str] = dataclasses.field(default_factory=lambda: ["text", "image", "speech"])
    split: List[str] = dataclasses.field(default_factory=list)
    split_ssm: bool = False
    initializer_range: float = 0.02

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"momoe: MambaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"momoe: MambaConfig.dt_rank must be >= 1 or None, got {self.dt_rank}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"momoe: MambaConfig.modalities must be distinct names, got {self.modalities}")
        unknown = sorted(set(self.split) - set(SPLITTABLE_PROJECTIONS))
        if unknown:
            raise ValueError(f"momoe: MambaConfig.split has unknown projections {unknown}; "
                             f"choose from {list(SPLITTABLE_PROJECTIONS)}")
        self.split = [p for p in SPLITTABLE_PROJECTIONS if p in self.split]
        self.modalities = list(self.modalities)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def is_mixture(self) -> bool:
        """True when some parameters are per modality (Mixture-of-Mamba)."""
        return self.num_modalities > 1 and (bool(self.split) or self.split_ssm)
