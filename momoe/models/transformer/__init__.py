"""Early-fusion transformers: the dense baseline and Mixture-of-Transformers."""
from momoe.models.transformer.configuration_transformer import TransformerConfig
from momoe.models.transformer.modeling_transformer import TransformerCache, TransformerLM

__all__ = ["TransformerCache", "TransformerConfig", "TransformerLM"]
