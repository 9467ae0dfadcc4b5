"""Import and export of Mamba (v1) checkpoints in the two layouts users already have.

A checkpoint folder holds config.json and weights; its layout is one of
- "momoe": momoe's own (config.json has `momoe_version`), read by `PreTrainedModel.from_pretrained`;
- "mamba-ssm": state-spaces/mamba's `MambaLMHeadModel` (config.json: d_model, n_layer, vocab_size,
  ssm_cfg, rms_norm, ...; tensors backbone.embedding.weight, backbone.layers.{i}.{norm,mixer}.*,
  backbone.norm_f.weight, lm_head.weight), in pytorch_model.bin or model.safetensors;
- "hf": transformers' `MambaForCausalLM` (config.json: model_type "mamba", hidden_size,
  num_hidden_layers, state_size, ...; tensors as mamba-ssm's but backbone.embeddings.weight).

Both external layouts keep the mixer parameters without momoe's modality dimension and call dt's bias
`dt_proj.bias`: import adds a leading modality dimension of size 1 (a dense `MambaLM`) and renames it
`dt_bias`; export does the reverse. Imported models get MambaConfig's default modalities, so they can
be upcycled to Mixture-of-Mamba (`momoe.upcycle`).

Shape legend: V vocabulary (rows of the embedding), D d_model, E d_inner = expand * D, N d_state,
R dt_rank, K d_conv.
"""
import math
import os
import pickle
from typing import Any, Callable, Collection, Dict, Literal, Mapping, Optional

import torch

from momoe.checkpoint import (
    CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_tensors, load_json, load_weights, save_json, save_weights,
)
from momoe.models.mamba.configuration_mamba import MambaConfig
from momoe.models.mamba.modeling_mamba import MambaLM
from momoe.models.modeling_utils import PreTrainedModel

Layout = Literal["momoe", "mamba-ssm", "hf"]

BIN_NAME = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"
EMBEDDING_NAMES: Dict[str, str] = {"mamba-ssm": "backbone.embedding.weight", "hf": "backbone.embeddings.weight"}
LAYOUT_TITLES: Dict[str, str] = {"mamba-ssm": "mamba-ssm", "hf": "Hugging Face MambaForCausalLM"}

# mamba-ssm's MambaConfig fields (its MambaConfig(**config) rejects any other key, and so do we).
MAMBA_SSM_KEYS = frozenset({
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
    "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
})
# Arguments of mamba-ssm's Mamba (v1) mixer; dt_min ... use_fast_path only shape its initialisation or
# pick a kernel, so they do not matter once the weights are loaded.
SSM_CFG_KEYS = frozenset({
    "layer", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
    "conv_bias", "bias", "use_fast_path",
})
# mamba-ssm builds its RMSNorms with MixerModel's default epsilon; its config has no field for it.
MAMBA_SSM_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------- detection
def detect_layout(config: Mapping[str, Any], names: Optional[Collection[str]] = None, source: str = "") -> Layout:
    """The layout of a checkpoint from its config.json and, when given, its tensor names.

    config.json tells the family: `momoe_version` (momoe), model_type "mamba" or architectures
    MambaForCausalLM (Hugging Face), d_model + n_layer (mamba-ssm). The tensor names, when given, must
    agree (the embedding is `backbone.embedding.weight` in mamba-ssm, `backbone.embeddings.weight` in HF).
    Raises CheckpointError for any other config (e.g. Mamba-2 or other Hugging Face architectures).
    """
    layout = _layout_from_config(config, source)
    if names is not None and layout != "momoe" and EMBEDDING_NAMES[layout] not in names:
        for other, embedding in EMBEDDING_NAMES.items():
            if embedding in names:
                raise CheckpointError(f"momoe: {source}: config.json is a {LAYOUT_TITLES[layout]} config but the "
                                      f"tensors are named as in {LAYOUT_TITLES[other]} ({embedding})")
    return layout


def _layout_from_config(config: Mapping[str, Any], source: str) -> Layout:
    if "momoe_version" in config:
        return "momoe"
    architectures = config.get("architectures") or []
    if config.get("model_type") == "mamba" or "MambaForCausalLM" in architectures:
        return "hf"
    if "model_type" in config or architectures:
        raise CheckpointError(
            f"momoe: {source}: unsupported checkpoint (model_type {config.get('model_type')!r}, architectures "
            f"{list(architectures)}): momoe imports Mamba v1 checkpoints, from Hugging Face as MambaForCausalLM "
            f"(model_type 'mamba') or from mamba-ssm")
    if "d_model" in config and "n_layer" in config:
        return "mamba-ssm"
    raise CheckpointError(
        f"momoe: {source}: unknown checkpoint layout: config.json has neither momoe_version (momoe), model_type "
        f"'mamba' (Hugging Face MambaForCausalLM) nor d_model and n_layer (mamba-ssm); its keys: {sorted(config)}")


# ----------------------------------------------------------------------------- reading tensors
def read_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the checkpoint folder `path`, on the CPU: from model.safetensors, else
    pytorch_model.bin (torch.load with weights_only=True: no code in the file runs), or their sharded
    forms (`<name>.index.json` with a weight_map). Unreadable files raise CheckpointError."""
    for name, reader in ((WEIGHTS_NAME, load_weights), (BIN_NAME, _load_bin)):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return reader(file)
        if os.path.isfile(file + INDEX_SUFFIX):
            return _load_shards(file + INDEX_SUFFIX, reader)
    wanted = [WEIGHTS_NAME, WEIGHTS_NAME + INDEX_SUFFIX, BIN_NAME, BIN_NAME + INDEX_SUFFIX]
    raise CheckpointError(f"momoe: {path} has no weights: expected one of {wanted}")


def _load_bin(file: str) -> Dict[str, torch.Tensor]:
    """A pickled dict of named tensors, read with torch.load(weights_only=True)."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's text ends with advice to unpickle it anyway: left out
        detail = str(error).split("WeightsUnpickler error: ")[-1].split(". Please")[0].strip()
        raise CheckpointError(f"momoe: {file} is not a readable PyTorch weights file: it holds objects other "
                              f"than tensors, which momoe never unpickles ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"momoe: {file} is not a readable PyTorch weights file ({error})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"momoe: {file} must hold a dict of named tensors, got {type(obj).__name__}")
    return obj


def _load_shards(index: str, reader: Callable[[str], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: index is {"weight_map": {tensor name: shard file}}."""
    weight_map = load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"momoe: {index} must hold a weight_map of tensor name -> shard file")
    bad = sorted({f for f in weight_map.values() if os.path.basename(f) != f})
    if bad:
        raise CheckpointError(f"momoe: {index} names shards outside its folder: {bad}")
    state: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(reader(os.path.join(os.path.dirname(index), shard)))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"momoe: {index} lists tensors that no shard holds: {absent[:8]}")
    return state


# ----------------------------------------------------------------------------- configs
def _integer(data: Mapping[str, Any], key: str, default: Any, source: str) -> int:
    """data[key] (or default) as an int; integral floats (2.0) are accepted, anything else is an error."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise CheckpointError(f"momoe: {source}: config.json's {key} must be an integer, got {value!r}")
    return int(value)


def _dt_rank(data: Mapping[str, Any], key: str, source: str) -> Optional[int]:
    """mamba-ssm's dt_rank / HF's time_step_rank: "auto" (the default) -> None, momoe's ceil(D / 16)."""
    return None if data.get(key, "auto") == "auto" else _integer(data, key, None, source)


def _mamba_config(source: str, **fields: Any) -> MambaConfig:
    """A dense MambaConfig (default modalities, so it can be upcycled); invalid fields -> CheckpointError."""
    try:
        return MambaConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"momoe: {source}: {error}") from None


def _unsupported(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"momoe: {source}: unsupported Mamba variant: {what}; momoe imports dense Mamba v1 "
                           f"language models with RMSNorm")


def config_from_mamba_ssm(data: Mapping[str, Any], vocab_rows: Optional[int], source: str = "") -> MambaConfig:
    """MambaConfig of a mamba-ssm config.json. vocab_rows: the embedding's row count (mamba-ssm pads
    vocab_size up to a multiple of pad_vocab_size_multiple); None uses that padded size.

    Accepted as they are: `fused_add_norm` (a kernel fusion, same math) and `residual_in_fp32` (the
    residual stream kept in fp32): momoe's is fp32 already, since its weights are fp32 and, under bf16
    autocast, the embedding output stays fp32 and x + mixer(norm(x)) promotes to fp32, so the flag
    changes no result in fp32 (mamba-ssm's residual_in_fp32=False only differs with low-precision weights).
    Rejected: Mamba-2 layers, attention layers, MLPs (d_intermediate > 0), LayerNorm (rms_norm=False).
    """
    unknown = sorted(set(data) - MAMBA_SSM_KEYS)
    if unknown:
        raise CheckpointError(f"momoe: {source}: unknown mamba-ssm config keys {unknown}; "
                              f"known: {sorted(MAMBA_SSM_KEYS)}")
    ssm_cfg = data.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise CheckpointError(f"momoe: {source}: ssm_cfg must be a dict, got {ssm_cfg!r}")
    unknown = sorted(set(ssm_cfg) - SSM_CFG_KEYS)
    if unknown:
        raise CheckpointError(f"momoe: {source}: unknown ssm_cfg keys {unknown}; known: {sorted(SSM_CFG_KEYS)}")
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise _unsupported(source, f"ssm_cfg.layer = {ssm_cfg['layer']!r}")
    if data.get("attn_layer_idx"):
        raise _unsupported(source, f"attention layers {data['attn_layer_idx']}")
    if data.get("d_intermediate", 0):
        raise _unsupported(source, f"an MLP in every block (d_intermediate = {data['d_intermediate']})")
    if not data.get("rms_norm", True):
        raise _unsupported(source, "LayerNorm (rms_norm = false)")
    if vocab_rows is None:
        multiple = _integer(data, "pad_vocab_size_multiple", 8, source)
        vocab_rows = multiple * math.ceil(_integer(data, "vocab_size", 50277, source) / multiple)
    return _mamba_config(
        source, vocab_size=vocab_rows, d_model=_integer(data, "d_model", None, source),
        n_layer=_integer(data, "n_layer", None, source), d_state=_integer(ssm_cfg, "d_state", 16, source),
        d_conv=_integer(ssm_cfg, "d_conv", 4, source), expand=_integer(ssm_cfg, "expand", 2, source),
        dt_rank=_dt_rank(ssm_cfg, "dt_rank", source), conv_bias=bool(ssm_cfg.get("conv_bias", True)),
        bias=bool(ssm_cfg.get("bias", False)), norm_eps=MAMBA_SSM_NORM_EPS,
        tie_embeddings=bool(data.get("tie_embeddings", True)),
    )


def config_from_hf(data: Mapping[str, Any], source: str = "") -> MambaConfig:
    """MambaConfig of a transformers MambaConfig's config.json (MambaForCausalLM).

    Only the keys that define the model are read; the rest (token ids, time_step_* initialisation,
    use_cache, use_mambapy, ...) do not change the computation. `residual_in_fp32` is accepted for the
    reason given in config_from_mamba_ssm. hidden_act must be SiLU, and intermediate_size, when
    present, expand * hidden_size.
    """
    hidden = _integer(data, "hidden_size", None, source)
    expand = _integer(data, "expand", 2, source)
    if data.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _unsupported(source, f"hidden_act {data['hidden_act']!r} (Mamba uses silu)")
    if _integer(data, "intermediate_size", expand * hidden, source) != expand * hidden:
        raise _unsupported(source, f"intermediate_size {data['intermediate_size']} != expand * hidden_size "
                                   f"({expand} * {hidden})")
    return _mamba_config(
        source, vocab_size=_integer(data, "vocab_size", 50280, source), d_model=hidden,
        n_layer=_integer(data, "num_hidden_layers", None, source), d_state=_integer(data, "state_size", 16, source),
        d_conv=_integer(data, "conv_kernel", 4, source), expand=expand,
        dt_rank=_dt_rank(data, "time_step_rank", source),
        conv_bias=bool(data.get("use_conv_bias", True)), bias=bool(data.get("use_bias", False)),
        norm_eps=float(data.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
        initializer_range=float(data.get("initializer_range", 0.02)),
    )


# ----------------------------------------------------------------------------- names and shapes
def _has_modality_dim(name: str) -> bool:
    """Whether momoe's tensor `name` has the leading modality dimension (every mixer parameter but the conv)."""
    return ".mixer." in name and ".conv1d." not in name


def _external_name(name: str, layout: str) -> str:
    """momoe's tensor name -> its name in the mamba-ssm / HF layout."""
    if name == "embedding.weight":
        return EMBEDDING_NAMES[layout]
    if name == "lm_head.weight":
        return name
    if name.endswith(".mixer.dt_bias"):
        name = name[: -len("dt_bias")] + "dt_proj.bias"
    return "backbone." + name


def _external_names(model: PreTrainedModel, layout: str) -> Dict[str, str]:
    """{momoe name: name in the layout} of the tensors a checkpoint stores (a tied lm_head is not stored)."""
    aliases = model.tied_aliases()
    return {name: _external_name(name, layout) for name in model.state_dict() if name not in aliases}


def external_state(model: PreTrainedModel, layout: str) -> Dict[str, torch.Tensor]:
    """The model's tensors with the mamba-ssm / HF layout's names and shapes (views, no copies): the
    modality dimension dropped ((1, 2E, D) -> (2E, D), (1, E) -> (E,), ...), a tied lm_head left out."""
    state = model.state_dict()
    return {ext: (state[name][0] if _has_modality_dim(name) else state[name])
            for name, ext in _external_names(model, layout).items()}


def _drop_tied_head(state: Dict[str, torch.Tensor], layout: str, source: str) -> None:
    """With tied embeddings the LM head may be stored too (mamba-ssm's torch.save does): it must then
    equal the embedding, and is dropped."""
    head = state.pop("lm_head.weight", None)
    embedding = state.get(EMBEDDING_NAMES[layout])
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise CheckpointError(f"momoe: {source}: config.json ties the embeddings but lm_head.weight differs "
                              f"from {EMBEDDING_NAMES[layout]}")


def _to_momoe_state(
    model: PreTrainedModel, state: Mapping[str, torch.Tensor], layout: str, source: str
) -> Dict[str, torch.Tensor]:
    """Checked mamba-ssm / HF tensors (a tied head already dropped) -> the model's names and shapes."""
    names = {ext: name for name, ext in _external_names(model, layout).items()}
    expected = {ext: t.shape for ext, t in external_state(model, layout).items()}
    check_tensors(expected, state, f"momoe: {source} ({LAYOUT_TITLES[layout]} layout) does not match its config.json")
    return {names[ext]: (t.unsqueeze(0) if _has_modality_dim(names[ext]) else t) for ext, t in state.items()}


# ----------------------------------------------------------------------------- import
def import_mamba(path: str) -> MambaLM:
    """A dense MambaLM (fp32, CPU) from a mamba-ssm or Hugging Face MambaForCausalLM checkpoint folder.

    Returns a model whose forward gives the source model's logits `[B, L, V]` (V: the embedding's
    rows, mamba-ssm's padded vocabulary). Raises CheckpointError on an unknown or unsupported layout,
    unreadable files, and missing, unexpected, wrongly shaped or non-float tensors.

    Example::

        model = import_mamba("mamba-130m/")      # or momoe.from_pretrained("mamba-130m/")
    """
    data = load_json(os.path.join(path, CONFIG_NAME))
    state = read_tensors(path)
    layout = detect_layout(data, state, source=path)
    if layout == "momoe":
        raise CheckpointError(f"momoe: {path} is a momoe checkpoint: load it with momoe.from_pretrained")
    if layout == "mamba-ssm":
        embedding = state.get(EMBEDDING_NAMES[layout])
        rows = embedding.shape[0] if embedding is not None and embedding.dim() == 2 else None
        config = config_from_mamba_ssm(data, rows, source=path)
    else:
        config = config_from_hf(data, source=path)
    if config.tie_embeddings:
        _drop_tied_head(state, layout, path)
    model = MambaLM(config)
    model.load_checked_state_dict(_to_momoe_state(model, state, layout, path), source=path)
    return model


# ----------------------------------------------------------------------------- export
def _dense_config(model: PreTrainedModel, layout: str) -> MambaConfig:
    """The config of a dense MambaLM; TypeError for another model, ValueError for a Mixture-of-Mamba."""
    config = model.config
    if not isinstance(model, MambaLM) or not isinstance(config, MambaConfig):
        raise TypeError(f"momoe: only a MambaLM can be exported to the {LAYOUT_TITLES[layout]} layout, "
                        f"got {type(model).__name__}")
    if config.is_mixture:
        raise ValueError(f"momoe: a Mixture-of-Mamba model (split={config.split}, split_ssm={config.split_ssm}) "
                         f"has per-modality parameters that the {LAYOUT_TITLES[layout]} layout cannot hold; only "
                         f"dense Mamba models can be exported")
    return config


def _write(model: PreTrainedModel, path: str, layout: str, config: Dict[str, Any]) -> None:
    from momoe import __version__

    save_weights(external_state(model, layout), os.path.join(path, WEIGHTS_NAME),
                 metadata={"format": "pt", "exported_by": f"momoe {__version__}"})
    save_json(config, os.path.join(path, CONFIG_NAME))


def export_mamba_ssm(model: PreTrainedModel, path: str) -> None:
    """Write a dense MambaLM as a mamba-ssm checkpoint: `path/config.json` (mamba-ssm 2.x MambaConfig
    fields, Mamba1 layers, pad_vocab_size_multiple 1 so vocab_size is the embedding's V rows) and
    `path/model.safetensors` (never a pickle; a tied lm_head is not stored). mamba-ssm's own
    from_pretrained reads only pytorch_model.bin: load these with `safetensors.torch.load_file`, then
    `MambaLMHeadModel(config).load_state_dict(tensors, strict=False)` (strict=False for the tied head).

    Raises TypeError for another model, ValueError for a Mixture-of-Mamba model or a norm_eps that
    mamba-ssm cannot express (it is 1e-5).
    """
    cfg = _dense_config(model, "mamba-ssm")
    if cfg.norm_eps != MAMBA_SSM_NORM_EPS:
        raise ValueError(f"momoe: mamba-ssm's RMSNorm epsilon is fixed at {MAMBA_SSM_NORM_EPS}; this model uses "
                         f"norm_eps={cfg.norm_eps}")
    ssm_cfg = {"layer": "Mamba1", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
               "dt_rank": "auto" if cfg.dt_rank is None else cfg.dt_rank, "conv_bias": cfg.conv_bias,
               "bias": cfg.bias}
    config = {"d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
              "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.tie_embeddings}
    _write(model, path, "mamba-ssm", config)


def export_hf_mamba(model: PreTrainedModel, path: str) -> None:
    """Write a dense MambaLM as a Hugging Face MambaForCausalLM checkpoint: `path/config.json` and
    `path/model.safetensors` (a tied lm_head is not stored, as save_pretrained does), loadable with
    `transformers.MambaForCausalLM.from_pretrained(path)`. Raises TypeError for another model,
    ValueError for a Mixture-of-Mamba model.
    """
    cfg = _dense_config(model, "hf")
    dt_rank = math.ceil(cfg.d_model / 16) if cfg.dt_rank is None else cfg.dt_rank  # HF saves "auto" resolved
    config = {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "state_size": cfg.d_state,
        "conv_kernel": cfg.d_conv, "expand": cfg.expand, "intermediate_size": cfg.expand * cfg.d_model,
        "time_step_rank": dt_rank, "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias,
        "hidden_act": "silu", "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": True,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.initializer_range,
    }
    _write(model, path, "hf", config)


EXPORTERS: Dict[str, Callable[[PreTrainedModel, str], None]] = {"mamba-ssm": export_mamba_ssm, "hf": export_hf_mamba}
