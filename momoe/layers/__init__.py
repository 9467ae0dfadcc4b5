"""Building blocks shared by the models: norms, modality-split linear layers, Mamba mixers."""
from momoe.layers.modality_linear import ModalityLinear, ModalityRouting
from momoe.layers.norms import RMSNorm

__all__ = ["ModalityLinear", "ModalityRouting", "RMSNorm"]
