"""Configuration of early-fusion transformers: dense (Chameleon-style) or Mixture-of-Transformers."""
import dataclasses
from typing import List, Optional, Union

from momoe.layers.depth import GATES as DEPTH_GATES, SELECTIONS as DEPTH_SELECTIONS, WEIGHTINGS as DEPTH_WEIGHTINGS
from momoe.models.configuration_utils import ModelConfig


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
    """A decoder-only transformer over one token space shared by every modality (early fusion).

    `modality_split` gives each modality its own attention projections, FFN and norms while attention
    stays global over the whole sequence (Mixture-of-Transformers, Liang et al. 2024); False is the
    dense Chameleon-style baseline. `d_ff` None: SwiGLU's 8/3 d_model rounded up to `multiple_of`.
    `norm_position`: "pre" (x + f(norm(x)), Llama) or "post" (x + norm(f(x)): the Swin-v2 norm placement
    of Chameleon-34B, which MoMa applies after its expert layers).

    Mixture-of-depths (Raposo et al. 2024; see `momoe.layers.depth`): the layers in `mod_layers` are
    depth-routed. Each processes `mod_capacity` (one number, or one per MoD layer) of the routable
    tokens (those of `mod_modalities`, None: all; other modalities always go through) of each
    `mod_selection` group ("sequence", "batch", "span"), weighted by `mod_gate` ("sigmoid", "linear",
    "tanh_norm") applied as `mod_weighting` says ("block", "ffn", "symmetric"); `mod_shared_router`
    gives every MoD layer the same router (γ-MoD).
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
    norm_position: str = "pre"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    modalities: List[str] = dataclasses.field(default_factory=lambda: ["text", "image", "speech"])
    modality_split: bool = False
    mod_layers: List[int] = dataclasses.field(default_factory=list)
    mod_capacity: Union[float, List[float]] = 0.125
    mod_selection: str = "sequence"
    mod_gate: str = "sigmoid"
    mod_weighting: str = "block"
    mod_modalities: Optional[List[str]] = None
    mod_shared_router: bool = False
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
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"momoe: norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        self.validate_depth_routing()

    def validate_depth_routing(self) -> None:
        self.mod_layers = list(self.mod_layers)
        if self.mod_layers != sorted(set(self.mod_layers)) or any(not 0 <= i < self.n_layer for i in self.mod_layers):
            raise ValueError(f"momoe: mod_layers must be increasing layer indices in [0, {self.n_layer}), "
                             f"got {self.mod_layers}")
        capacities = self.mod_capacity if isinstance(self.mod_capacity, list) else [self.mod_capacity]
        if isinstance(self.mod_capacity, list) and len(self.mod_capacity) != len(self.mod_layers):
            raise ValueError(f"momoe: mod_capacity lists {len(self.mod_capacity)} capacities for "
                             f"{len(self.mod_layers)} mod_layers (give one number, or one per MoD layer)")
        if any(not 0.0 < c <= 1.0 for c in capacities):
            raise ValueError(f"momoe: mod_capacity must be in (0, 1], got {self.mod_capacity}")
        for name, value, choices in (("mod_gate", self.mod_gate, DEPTH_GATES),
                                     ("mod_selection", self.mod_selection, DEPTH_SELECTIONS),
                                     ("mod_weighting", self.mod_weighting, DEPTH_WEIGHTINGS)):
            if value not in choices:
                raise ValueError(f"momoe: unknown {name} {value!r}; choose one of {choices}")
        if self.mod_modalities is not None:
            unknown = sorted(set(self.mod_modalities) - set(self.modalities))
            if unknown or not self.mod_modalities:
                raise ValueError(f"momoe: mod_modalities must be a non-empty subset of {self.modalities}, "
                                 f"got {self.mod_modalities}")

    def capacity_of(self, layer: int) -> float:
        """The depth-routing capacity of MoD layer `layer` (one of mod_layers)."""
        if isinstance(self.mod_capacity, list):
            return self.mod_capacity[self.mod_layers.index(layer)]
        return self.mod_capacity

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
