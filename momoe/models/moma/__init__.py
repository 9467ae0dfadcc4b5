from momoe.models.moma.configuration_moma import MoMaConfig
from momoe.models.moma.modeling_moma import MoMaBlock, MoMaLM

__all__ = ["MoMaBlock", "MoMaConfig", "MoMaLM"]
