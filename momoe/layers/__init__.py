"""Building blocks shared by the models: norms, modality-split linear layers, attention, FFNs, expert
banks, routers, Mamba mixers."""
from momoe.layers.attention import Attention, KVCache
from momoe.layers.experts import ExpertFFN, dispatch_combine
from momoe.layers.ffn import SwiGLU
from momoe.layers.modality_linear import ModalityLinear, ModalityRouting
from momoe.layers.modality_norm import ModalityRMSNorm
from momoe.layers.norms import RMSNorm
from momoe.layers.routers import ExpertChoiceRouter, KMeansRouter, TokenChoiceRouter

__all__ = [
    "Attention",
    "ExpertChoiceRouter",
    "ExpertFFN",
    "KMeansRouter",
    "KVCache",
    "ModalityLinear",
    "ModalityRMSNorm",
    "ModalityRouting",
    "RMSNorm",
    "SwiGLU",
    "TokenChoiceRouter",
    "dispatch_combine",
]
