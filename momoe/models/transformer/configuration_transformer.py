"""Configuration of early-fusion transformers: dense (Chameleon-style) or Mixture-of-Transformers."""
import dataclasses
from typing import List, Optional

from momoe.layers.depth import GATES as DEPTH_GATES
from momoe.models.configuration_utils import ModelConfig


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
    """A decoder-only transformer over one token space shared by every modality (early fusion).

    `modality_split` gives each modality its own attention projections, FFN and norms while attention
    stays global over the whole sequence (Mixture-of-Transformers, Liang et al. 2024); False is the
    dense Chameleon-style baseline. `d_ff` None: SwiGLU's 8/3 d_model rounded up to `multiple_of`.

    Mixture-of-depths (Raposo et al. 2024): the layers in `mod_layers` are depth-routed; each processes
    `mod_capacity` of every sequence's routable tokens (the tokens of `mod_modalities`, None: all; other
    modalities always go through), their updates weighted by `mod_gate` ("sigmoid" or "linear", see
    `momoe.layers.depth.DepthRouter`).
    """

    model_type = "transformer"

    vocab_size: int = 65536
    d_model: int = 768
    n_layer: int = 12
    n_heads: int = 12
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head attention); fewer: GQA
    d_ff: Optional[int] = None
    multiple_of: int = 256
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    modalities: List[str] = dataclasses.field(default_factory=lambda: ["text", "image", "speech"])
    modality_split: bool = False
    mod_layers: List[int] = dataclasses.field(default_factory=list)
    mod_capacity: float = 0.125
    mod_gate: str = "sigmoid"
    mod_modalities: Optional[List[str]] = None
    initializer_range: float = 0.02

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_heads", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"momoe: TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"momoe: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv != 0:
            raise ValueError(f"momoe: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"momoe: TransformerConfig.d_ff must be >= 1 or None, got {self.d_ff}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"momoe: TransformerConfig.modalities must be distinct names, got {self.modalities}")
        self.modalities = list(self.modalities)
        self.validate_depth_routing()

    def validate_depth_routing(self) -> None:
        self.mod_layers = sorted(set(self.mod_layers))
        if any(not 0 <= i < self.n_layer for i in self.mod_layers):
            raise ValueError(f"momoe: mod_layers must be layer indices in [0, {self.n_layer}), got {self.mod_layers}")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ValueError(f"momoe: mod_capacity must be in (0, 1], got {self.mod_capacity}")
        if self.mod_gate not in DEPTH_GATES:
            raise ValueError(f"momoe: unknown mod_gate {self.mod_gate!r}; choose one of {DEPTH_GATES}")
        if self.mod_modalities is not None:
            unknown = sorted(set(self.mod_modalities) - set(self.modalities))
            if unknown or not self.mod_modalities:
                raise ValueError(f"momoe: mod_modalities must be a non-empty subset of {self.modalities}, "
                                 f"got {self.mod_modalities}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        hidden = int(8 * self.d_model / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def is_mixture(self) -> bool:
        return self.modality_split and self.num_modalities > 1
