"""Which model to train or describe: a zoo card, a config JSON file, a checkpoint, or a family with sizes.

Families (`family_config`): "transformer" (dense early fusion, Chameleon-style), "mot"
(Mixture-of-Transformers), "moma" (MoMa: `experts` experts per modality, expert choice),
"mamba" (dense Mamba), "mom-mamba" (Mixture-of-Mamba: in_proj, x_proj, dt_proj, out_proj per
modality), "mor" (Mixture-of-Recursions). vocab_size and modalities come from the data's vocabulary.
"""
import os
from typing import Any, Dict, Optional

import torch

from momoe.checkpoint import CONFIG_NAME, load_json
from momoe.data import Vocabulary
from momoe.models import (
    MambaConfig,
    MoMaConfig,
    ModelConfig,
    TransformerConfig,
    build_model,
    config_from_dict,
    list_cards,
    load_card,
)
from momoe.models.mor import MoRConfig
from momoe.train.checkpointing import resolve_checkpoint

FAMILIES = ("transformer", "mot", "moma", "mamba", "mom-mamba", "mor")
MIXTURE_OF_MAMBA_SPLIT = ["in_proj", "x_proj", "dt_proj", "out_proj"]


def family_config(family: str, vocab: Vocabulary, d_model: int = 128, n_layer: int = 4, n_heads: int = 4,
                  experts: int = 2, d_ff: Optional[int] = None) -> ModelConfig:
    """A config of `family` sized by the arguments, reading `vocab`'s ids and modalities.

    experts: experts per modality (MoMa); n_layer: the depth of a token that takes every recursion (MoR:
    2 unique layers around a shared block of (n_layer - 2) // 2 layers applied twice)."""
    modalities = list(vocab.names)
    common: Dict[str, Any] = dict(vocab_size=vocab.size, d_model=d_model, modalities=modalities)
    attention = dict(common, n_heads=n_heads, d_ff=d_ff, multiple_of=32, qk_norm=True)
    if family in ("transformer", "mot"):
        return TransformerConfig(n_layer=n_layer, modality_split=family == "mot", **attention)
    if family == "moma":
        return MoMaConfig(n_layer=n_layer, experts_per_modality=[experts] * len(modalities), **attention)
    if family in ("mamba", "mom-mamba"):
        return MambaConfig(n_layer=n_layer, split=MIXTURE_OF_MAMBA_SPLIT if family == "mom-mamba" else [], **common)
    if family == "mor":
        return MoRConfig(n_kv_heads=None, num_recursions=2, recursion_layers=max(1, (n_layer - 2) // 2), **attention)
    raise ValueError(f"momoe: unknown model family {family!r}; choose one of {list(FAMILIES)}")


def load_model_config(spec: str) -> ModelConfig:
    """A zoo card name, a JSON file (a config, a card with a "config" entry, or a checkpoint's
    config.json), a checkpoint folder or a training run folder -> its config."""
    if spec in list_cards():
        return load_card(spec)
    path = os.path.join(resolve_checkpoint(spec), CONFIG_NAME) if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"momoe: {spec!r} is not a zoo card (momoe.list_cards()), a config JSON file or a "
                         f"checkpoint folder")
    data = load_json(path)
    if "config" in data and "model_type" not in data:
        data = data["config"]
    return config_from_dict({k: v for k, v in data.items() if k != "momoe_version"})


def fit_to_vocab(config: ModelConfig, vocab: Vocabulary, resize: bool = False) -> ModelConfig:
    """Check that a model of `config` reads the data (ValueError naming the mismatch); with resize,
    first set vocab_size to the data's vocabulary size (a card's 65,536 ids -> the data's)."""
    if resize:
        config = config.replace(vocab_size=vocab.size)
    vocab.check_model(config.vocab_size, config.modalities)
    return config


def meta_model(config: ModelConfig) -> torch.nn.Module:
    """The model of `config` without memory (meta tensors): for counting parameters of any size."""
    with torch.device("meta"):
        return build_model(config)
