"""Mamba language models: dense Mamba and Mixture-of-Mamba (modality-specific projections)."""
from momoe.models.mamba.configuration_mamba import MambaConfig
from momoe.models.mamba.modeling_mamba import MambaCache, MambaLM

__all__ = ["MambaCache", "MambaConfig", "MambaLM"]
