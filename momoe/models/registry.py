"""From a config, a card name or a checkpoint to a model; parameter accounting; upcycling."""
import json
import os
from typing import Any, Dict, List, Mapping, Tuple, Type, Union

import torch
from torch import nn

from momoe.checkpoint import CONFIG_NAME, CheckpointError, load_json
from momoe.models.accounting import count_parameters, flops_per_token  # noqa: F401  (re-exported)
from momoe.models.configuration_utils import ModelConfig
from momoe.models.mamba import MambaConfig, MambaLM
from momoe.models.moma import MoMaConfig, MoMaLM
from momoe.models.mor import MoRConfig, MoRLM
from momoe.models.transformer import TransformerConfig, TransformerLM
from momoe.models.modeling_utils import PreTrainedModel

# model_type -> (config class, model class)
MODEL_TYPES: Dict[str, Tuple[Type[ModelConfig], Type[PreTrainedModel]]] = {
    MambaConfig.model_type: (MambaConfig, MambaLM),
    TransformerConfig.model_type: (TransformerConfig, TransformerLM),
    MoMaConfig.model_type: (MoMaConfig, MoMaLM),
    MoRConfig.model_type: (MoRConfig, MoRLM),
}


def _find_cards_dir() -> str:
    """Where the zoo cards are: momoe/models/cards in an installed wheel (setup.py maps the repository's
    models/ folder there as package data), else models/ at the root of a source checkout (editable
    install, or running from the tree)."""
    here = os.path.dirname(os.path.abspath(__file__))  # .../momoe/models
    packaged = os.path.join(here, "cards")
    if os.path.isdir(packaged):
        return packaged
    return os.path.normpath(os.path.join(here, os.pardir, os.pardir, "models"))


CARDS_DIR = _find_cards_dir()


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A config from its dict form (config.json, a card's "config"); the dict names its model_type."""
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"momoe: unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0].from_dict(data)


def list_cards() -> List[str]:
    """Names of the zoo cards (models/<name>.json)."""
    if not os.path.isdir(CARDS_DIR):
        return []
    return sorted(f[: -len(".json")] for f in os.listdir(CARDS_DIR) if f.endswith(".json"))


def read_card(name: str) -> Dict[str, Any]:
    """The whole card: config, source paper, expected parameter counts."""
    path = os.path.join(CARDS_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise ValueError(f"momoe: no zoo card {name!r}; available: {list_cards()}")
    with open(path) as f:
        return json.load(f)


def load_card(name: str) -> ModelConfig:
    """The config of a zoo card, e.g. load_card("mom-mamba-1.4b-chameleon")."""
    return config_from_dict(read_card(name)["config"])


def build_model(config: Union[ModelConfig, str, Mapping[str, Any]]) -> PreTrainedModel:
    """A freshly initialised model from a config, a card name, or a config dict."""
    if isinstance(config, str):
        config = load_card(config)
    elif isinstance(config, Mapping):
        config = config_from_dict(config)
    for config_cls, model_cls in MODEL_TYPES.values():
        if type(config) is config_cls:
            return model_cls(config)
    raise TypeError(f"momoe: no model for config type {type(config).__name__}")


def from_pretrained(path: str) -> PreTrainedModel:
    """Load a checkpoint folder: momoe's own (config.json + model.safetensors), or a mamba-ssm or
    Hugging Face MambaForCausalLM checkpoint, imported as a dense MambaLM. The layout is told from
    config.json and the tensor names (momoe.models.mamba.convert_mamba.detect_layout)."""
    from momoe.models.mamba.convert_mamba import detect_layout, import_mamba

    data = load_json(os.path.join(path, CONFIG_NAME))
    if detect_layout(data, source=path) != "momoe":
        return import_mamba(path)
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"momoe: {path} is a momoe checkpoint of unknown model_type {model_type!r}; "
                              f"known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][1].from_pretrained(path)


def upcycle(dense: PreTrainedModel, config: ModelConfig) -> PreTrainedModel:
    """Sparse upcycling: a model of `config` whose per-modality parameters all start as copies of the
    dense model's (every other parameter copied as is), so a modality split computes exactly what
    `dense` does; depth routers (MoD layers) start fresh. Families with learned expert routing define
    their own `upcycle_from` (e.g. MoMa: experts from the FFN, fresh routers)."""
    sparse = build_model(config)
    if hasattr(sparse, "upcycle_from"):
        sparse.upcycle_from(dense)
        return sparse
    source = dense.state_dict()
    target = sparse.state_dict()
    # A depth router (MoD layers made from dense ones, as γ-MoD converts a trained model) starts fresh.
    missing = sorted(name for name in set(target) - set(source) if ".depth.router." not in name)
    if missing:
        raise ValueError(f"momoe: cannot upcycle: the dense model has no {missing[:5]}")
    with torch.no_grad():
        for name, t in target.items():
            if name not in source:
                continue
            s = source[name]
            if s.shape == t.shape:
                t.copy_(s)
            elif s.dim() == t.dim() and s.shape[0] == 1 and s.shape[1:] == t.shape[1:]:
                t.copy_(s.expand_as(t))
            else:
                raise ValueError(f"momoe: cannot upcycle {name}: dense shape {tuple(s.shape)}, "
                                 f"target shape {tuple(t.shape)}")
    return sparse
