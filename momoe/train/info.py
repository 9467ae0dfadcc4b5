"""`momoe info`: total and active parameters, and training FLOPs per token of each modality."""
from typing import Any, Dict

from momoe.models import count_parameters, flops_per_token
from momoe.models.configuration_utils import ModelConfig
from momoe.train.specs import meta_model
from momoe.train.table import format_table


def model_info(config: ModelConfig, seq_len: int = 256) -> Dict[str, Any]:
    """{"model_type", "seq_len", "total", "active_per_token": {modality: n}, "flops_per_token": {modality:
    training FLOPs}}. Parameters are counted on meta tensors: no memory, any size."""
    return {"model_type": config.model_type, "seq_len": seq_len, **count_parameters(meta_model(config)),
            "flops_per_token": flops_per_token(config, seq_len)}


def format_info(name: str, info: Dict[str, Any]) -> str:
    rows = [[m, active, info["flops_per_token"][m]] for m, active in info["active_per_token"].items()]
    table = format_table(["modality", "active params / token", f"train FLOPs / token (L={info['seq_len']})"], rows)
    return f"{name} ({info['model_type']}): {info['total']:,} parameters\n{table}"
