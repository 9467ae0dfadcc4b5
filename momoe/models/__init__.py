"""The model zoo: families, the registry from config to model, zoo cards, accounting, upcycling."""
from momoe.models.configuration_utils import ModelConfig
from momoe.models.mamba import MambaCache, MambaConfig, MambaLM
from momoe.models.modeling_utils import ModelOutput, PreTrainedModel
from momoe.models.moma import MoMaConfig, MoMaLM
from momoe.models.mor import MoRConfig, MoRLM
from momoe.models.transformer import TransformerCache, TransformerConfig, TransformerLM
from momoe.models.registry import (
    MODEL_TYPES,
    build_model,
    config_from_dict,
    count_parameters,
    flops_per_token,
    from_pretrained,
    list_cards,
    load_card,
    upcycle,
)

__all__ = [
    "MODEL_TYPES",
    "MambaCache",
    "MambaConfig",
    "MambaLM",
    "ModelConfig",
    "ModelOutput",
    "MoMaConfig",
    "MoMaLM",
    "MoRConfig",
    "MoRLM",
    "PreTrainedModel",
    "TransformerCache",
    "TransformerConfig",
    "TransformerLM",
    "build_model",
    "config_from_dict",
    "count_parameters",
    "flops_per_token",
    "from_pretrained",
    "list_cards",
    "load_card",
    "upcycle",
]
