"""Configuration of Mixture-of-Recursions language models (Bae et al. 2025, arXiv 2507.10524)."""
import dataclasses
from typing import List, Optional

from momoe.layers.recursion import CAUSAL_ROUTERS, check_capacity, default_capacity
from momoe.models.configuration_utils import ModelConfig
from momoe.models.transformer.configuration_transformer import TransformerConfig

SHARING = ("middle-cycle", "cycle")
ROUTERS = ("expert-choice", "token-choice")
KV_STRATEGIES = ("recursion-wise", "recursive-sharing")


@dataclasses.dataclass
class MoRConfig(ModelConfig):
    """A Llama-style decoder whose middle layers form one block of `recursion_layers` layers applied up
    to `num_recursions` times, each token taking as many steps as its router gives it.

    sharing: "middle-cycle" (the paper's choice: a unique first and last layer around the shared block,
    2 + recursion_layers distinct layers) or "cycle" (every layer in the shared block).
    router: "expert-choice" (each step keeps the top `capacity[r]` of every sequence among the tokens of
    the step before; None: the paper's (N_r - r) / N_r) or "token-choice" (depth chosen up front).
    kv_strategy: "recursion-wise" (a step attends to, and caches, the keys of the tokens active at that
    step) or "recursive-sharing" (every step attends to the keys and values of the first step, which
    all tokens take).
    router_alpha: scale of the gates; None: 0.1 for expert choice (alpha * sigmoid), 1.0 for token choice
    (softmax probability), the authors' settings. z_loss_coef None: 0 for expert choice, 1e-5 for token
    choice (the paper's runs). causal_router, aux_loss_coef: how expert choice is made causal for
    decoding (see `momoe.layers.recursion`); balance_loss_coef: the token-choice balancing loss.

    The layer fields (vocab_size ... tie_embeddings, initializer_range) mean what they mean in
    TransformerConfig; the model is dense (every modality shares every weight).
    """

    model_type = "mor"

    vocab_size: int = 49152
    d_model: int = 960
    n_heads: int = 15
    n_kv_heads: Optional[int] = 5
    d_ff: Optional[int] = 2560
    multiple_of: int = 256
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    modalities: List[str] = dataclasses.field(default_factory=lambda: ["text"])
    num_recursions: int = 3
    recursion_layers: int = 10
    sharing: str = "middle-cycle"
    router: str = "expert-choice"
    capacity: Optional[List[float]] = None
    kv_strategy: str = "recursion-wise"
    router_alpha: Optional[float] = None
    causal_router: str = "aux-loss"
    aux_loss_coef: float = 1e-3
    balance_loss_coef: float = 0.1
    z_loss_coef: Optional[float] = None
    initializer_range: float = 0.02

    def validate(self) -> None:
        for name in ("num_recursions", "recursion_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"momoe: MoRConfig.{name} must be >= 1, got {getattr(self, name)}")
        self.layer_config()  # the attention / FFN fields, checked as TransformerConfig checks them
        self.modalities = list(self.modalities)
        for name, value, choices in (("sharing", self.sharing, SHARING), ("router", self.router, ROUTERS),
                                     ("kv_strategy", self.kv_strategy, KV_STRATEGIES),
                                     ("causal_router", self.causal_router, CAUSAL_ROUTERS)):
            if value not in choices:
                raise ValueError(f"momoe: unknown MoRConfig.{name} {value!r}; choose one of {choices}")
        self.validate_routing()

    def validate_routing(self) -> None:
        if self.capacity is not None:
            if self.router != "expert-choice":
                raise ValueError("momoe: MoRConfig.capacity is the expert-choice schedule; token-choice routing "
                                 "has none (leave it None)")
            self.capacity = [float(c) for c in self.capacity]
            if len(self.capacity) != self.num_recursions:
                raise ValueError(f"momoe: MoRConfig.capacity needs one value per recursion step "
                                 f"({self.num_recursions}), got {self.capacity}")
            check_capacity(self.capacity)
        if self.kv_strategy == "recursive-sharing" and self.capacities[0] < 1.0:
            raise ValueError("momoe: recursive KV sharing reuses the first recursion's keys and values of every "
                             f"token, so the first step must take all tokens (capacity[0] = 1), got {self.capacity}")
        if self.router_alpha is not None and self.router_alpha <= 0:
            raise ValueError(f"momoe: MoRConfig.router_alpha must be > 0, got {self.router_alpha}")
        for name in ("aux_loss_coef", "balance_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"momoe: MoRConfig.{name} must be >= 0, got {value}")

    def layer_config(self) -> TransformerConfig:
        """The configuration of one transformer layer (the unique layers and the shared block's)."""
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layer=self.num_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, multiple_of=self.multiple_of, qk_norm=self.qk_norm,
            rope_theta=self.rope_theta, norm_eps=self.norm_eps, tie_embeddings=self.tie_embeddings,
            modalities=list(self.modalities), initializer_range=self.initializer_range)

    @property
    def num_unique_layers(self) -> int:
        """1 + 1 around the shared block with middle-cycle sharing, else 0."""
        return 2 if self.sharing == "middle-cycle" else 0

    @property
    def num_layers(self) -> int:
        """Layers a token that takes every recursion step goes through (the vanilla model's depth)."""
        return self.num_unique_layers + self.num_recursions * self.recursion_layers

    @property
    def capacities(self) -> List[float]:
        """The expert-choice capacity schedule (every step 1.0 with token choice: no capacity)."""
        if self.router == "token-choice":
            return [1.0] * self.num_recursions
        return default_capacity(self.num_recursions) if self.capacity is None else list(self.capacity)

    @property
    def alpha(self) -> float:
        if self.router_alpha is not None:
            return self.router_alpha
        return 0.1 if self.router == "expert-choice" else 1.0

    @property
    def router_z_loss_coef(self) -> float:
        if self.z_loss_coef is not None:
            return self.z_loss_coef
        return 0.0 if self.router == "expert-choice" else 1e-5

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)
