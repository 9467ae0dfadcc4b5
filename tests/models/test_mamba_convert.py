"""Mamba checkpoints in mamba-ssm's and Hugging Face's layouts: export -> import gives the same logits,
hand-written mamba-ssm files (pytorch_model.bin, shards) load, parity with transformers'
MambaForCausalLM both ways, clear CheckpointErrors on bad checkpoints, and `momoe convert`."""
import fractions
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import momoe
from momoe.checkpoint import CheckpointError, load_weights, save_weights
from momoe.cli import main
from momoe.models import MambaConfig, MambaLM
from momoe.models.mamba.convert_mamba import detect_layout, export_hf_mamba, export_mamba_ssm
from tests.utils import assert_close

EXPORTERS = {"mamba-ssm": export_mamba_ssm, "hf": export_hf_mamba}
VARIANTS = {
    "tied": {},
    "untied-bias-noconvbias": dict(tie_embeddings=False, bias=True, conv_bias=False, dt_rank=3, d_conv=3, expand=3),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(**kw) -> MambaConfig:
    base = dict(vocab_size=64, d_model=32, n_layer=2, d_state=8)
    base.update(kw)
    return MambaConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (so zero biases, A = -(1..N), D = 1 and the tied head hide nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tokens(vocab: int, B: int = 2, L: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def logits(model: MambaLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def read_config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def write_config(folder, data: dict) -> None:
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(data, f)


def mamba_ssm_tensors(model: MambaLM) -> dict:
    """The model's tensors named and shaped as mamba-ssm's MambaLMHeadModel.state_dict() (spelled out here,
    independently of convert_mamba): mixer parameters without the modality dimension, dt's bias in
    dt_proj.bias, the tied head stored too (sharing the embedding's storage, as torch.save keeps it)."""
    sd = {"backbone.embedding.weight": model.embedding.weight.detach().clone(),
          "backbone.norm_f.weight": model.norm_f.weight.detach().clone()}
    for i, layer in enumerate(model.layers):
        mx, prefix = layer.mixer, f"backbone.layers.{i}."
        sd[prefix + "norm.weight"] = layer.norm.weight
        sd[prefix + "mixer.conv1d.weight"] = mx.conv1d.weight
        sd[prefix + "mixer.conv1d.bias"] = mx.conv1d.bias
        for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "A_log", "D"):
            sd[prefix + "mixer." + name] = mx.get_parameter(name)[0]
        sd[prefix + "mixer.dt_proj.bias"] = mx.dt_bias[0]
    sd = {k: v.detach().clone() for k, v in sd.items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    return sd


# ----------------------------------------------------------------------------- roundtrips
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", list(EXPORTERS))
def test_export_import_roundtrip(tmp_path, layout, variant):
    model = randomize(MambaLM(tiny(**VARIANTS[variant])))
    EXPORTERS[layout](model, str(tmp_path))
    assert detect_layout(read_config(tmp_path), load_weights(str(tmp_path / "model.safetensors"))) == layout
    loaded = momoe.from_pretrained(str(tmp_path))
    assert isinstance(loaded, MambaLM) and not loaded.config.is_mixture
    assert loaded.config.modalities == MambaConfig().modalities
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    assert (loaded.lm_head.weight is loaded.embedding.weight) == model.config.tie_embeddings
    ids = tokens(64)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_hf_export_keeps_norm_eps_mamba_ssm_refuses_it(tmp_path):
    model = randomize(MambaLM(tiny(norm_eps=1e-6)))
    export_hf_mamba(model, str(tmp_path / "hf"))
    assert momoe.from_pretrained(str(tmp_path / "hf")).config.norm_eps == 1e-6
    with pytest.raises(ValueError, match="epsilon is fixed at 1e-05"):
        export_mamba_ssm(model, str(tmp_path / "ssm"))


@pytest.mark.parametrize("layout", list(EXPORTERS))
def test_mixture_of_mamba_export_refused(tmp_path, layout):
    model = MambaLM(tiny(split=["in_proj", "out_proj"]))
    with pytest.raises(ValueError, match="Mixture-of-Mamba model .* only dense Mamba models can be exported"):
        EXPORTERS[layout](model, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_imported_model_upcycles_to_mixture_of_mamba(tmp_path):
    model = randomize(MambaLM(tiny()))
    export_mamba_ssm(model, str(tmp_path))
    dense = momoe.from_pretrained(str(tmp_path))
    sparse = momoe.upcycle(dense, dense.config.replace(split=["in_proj", "x_proj", "dt_proj", "out_proj"]))
    ids = tokens(64)
    mod = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close("upcycled logits", dense(ids, mod).logits, sparse(ids, mod).logits, **TOL)


# ----------------------------------------------------------------------------- hand-written mamba-ssm files
def test_hand_written_mamba_ssm_bin_loads(tmp_path):
    """An original-style mamba-ssm checkpoint (mamba-130m's config keys, vocab padded 60 -> 64 rows,
    pytorch_model.bin holding a plain tensor dict with the tied head)."""
    model = randomize(MambaLM(tiny()))
    torch.save(mamba_ssm_tensors(model), tmp_path / "pytorch_model.bin")
    write_config(tmp_path, {"d_model": 32, "n_layer": 2, "vocab_size": 60, "ssm_cfg": {"d_state": 8},
                            "rms_norm": True, "residual_in_fp32": False, "fused_add_norm": False,
                            "pad_vocab_size_multiple": 8})
    loaded = momoe.from_pretrained(str(tmp_path))
    assert loaded.config.vocab_size == 64 and loaded.config.tie_embeddings
    ids = tokens(64)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_bf16_checkpoint_loads_into_fp32_model(tmp_path):
    model = randomize(MambaLM(tiny()))
    state = {k: v.to(torch.bfloat16) for k, v in mamba_ssm_tensors(model).items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, {"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"d_state": 8}})
    loaded = momoe.from_pretrained(str(tmp_path))
    assert loaded.embedding.weight.dtype == torch.float32
    assert torch.equal(loaded.layers[1].mixer.A_log[0], state["backbone.layers.1.mixer.A_log"].float())


def test_hand_written_sharded_safetensors_load(tmp_path):
    """mamba-ssm 2.x config (ssm_cfg with layer "Mamba1", dt_rank given), weights in two safetensors
    shards with an index, the tied head left out."""
    model = randomize(MambaLM(tiny(dt_rank=4)))
    tensors = mamba_ssm_tensors(model)
    del tensors["lm_head.weight"]
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(tmp_path / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_config(tmp_path, {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 64,
                            "ssm_cfg": {"layer": "Mamba1", "d_state": 8, "dt_rank": 4, "dt_min": 0.001},
                            "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
                            "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True})
    ids = tokens(64)
    assert torch.equal(logits(momoe.from_pretrained(str(tmp_path)), ids), logits(model, ids))
    weight_map["backbone.norm_f.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="names shards outside its folder"):
        momoe.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- Hugging Face parity
@pytest.fixture
def hf():
    return pytest.importorskip("transformers", reason="transformers is not installed: no Hugging Face parity check")


@pytest.mark.parametrize("variant", ["tied", "untied-bias-sharded"])
def test_hf_checkpoint_loads_with_same_logits(tmp_path, hf, variant):
    untied = variant != "tied"
    config = hf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                            expand=2, use_bias=untied, use_conv_bias=True, tie_word_embeddings=not untied)
    reference = randomize(hf.MambaForCausalLM(config))
    reference.save_pretrained(str(tmp_path), max_shard_size="20KB" if untied else "1GB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == untied
    loaded = momoe.from_pretrained(str(tmp_path))
    assert loaded.config.bias == untied and loaded.config.tie_embeddings == (not untied)
    ids = tokens(64)
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
    assert_close("logits", want, logits(loaded, ids), **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_to_hf_loads_in_transformers(tmp_path, hf, variant):
    model = randomize(MambaLM(tiny(**VARIANTS[variant])))
    export_hf_mamba(model, str(tmp_path))
    reference = hf.MambaForCausalLM.from_pretrained(str(tmp_path)).eval()
    tied = reference.lm_head.weight.data_ptr() == reference.backbone.embeddings.weight.data_ptr()
    assert tied == model.config.tie_embeddings
    ids = tokens(64)
    with torch.no_grad():
        got = reference(ids, use_cache=False).logits
    assert_close("logits", logits(model, ids), got, **TOL)


# ----------------------------------------------------------------------------- bad checkpoints
def exported(tmp_path, layout: str = "mamba-ssm", **kw) -> str:
    export = EXPORTERS[layout]
    export(randomize(MambaLM(tiny(**kw))), str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("backbone.layers.1.mixer.A_log"), r"missing tensors \['backbone.layers.1.mixer.A_log'\]"),
    (lambda s: s.update({"backbone.layers.0.mixer.D": torch.zeros(5)}),
     r"backbone.layers.0.mixer.D has shape \(5,\), expected \(64,\)"),
    (lambda s: s.update({"backbone.norm_f.weight": torch.zeros(32, dtype=torch.int32)}),
     "backbone.norm_f.weight has dtype torch.int32, expected a floating-point tensor"),
    (lambda s: s.update({"backbone.layers.0.mixer.extra": torch.zeros(1)}),
     r"unexpected tensors \['backbone.layers.0.mixer.extra'\]"),
    (lambda s: s.update({"lm_head.weight": torch.zeros(64, 32)}),
     "ties the embeddings but lm_head.weight differs from backbone.embedding.weight"),
    (lambda s: s.update({"backbone.embeddings.weight": s.pop("backbone.embedding.weight")}),
     "mamba-ssm config but the tensors are named as in Hugging Face"),
], ids=["missing", "shape", "int", "unexpected", "untied-head", "hf-names"])
def test_bad_tensors(tmp_path, edit, match):
    path = exported(tmp_path)
    weights = os.path.join(path, "model.safetensors")
    state = load_weights(weights)
    edit(state)
    save_weights(state, weights)
    with pytest.raises(CheckpointError, match=match):
        momoe.from_pretrained(path)


def test_unreadable_weight_files(tmp_path):
    path = exported(tmp_path)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        momoe.from_pretrained(path)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="has no weights: expected one of"):
        momoe.from_pretrained(path)
    binary = os.path.join(path, "pytorch_model.bin")
    with open(binary, "wb") as f:
        f.write(b"PK\x03\x04 not a zip archive")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a readable PyTorch weights file"):
        momoe.from_pretrained(path)
    torch.save({"backbone.norm_f.weight": fractions.Fraction(1, 2)}, binary)  # weights_only refuses to build it
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file.*Fraction"):
        momoe.from_pretrained(path)
    torch.save([torch.zeros(1)], binary)
    with pytest.raises(CheckpointError, match="must hold a dict of named tensors, got list"):
        momoe.from_pretrained(path)


@pytest.mark.parametrize("layout,edit,match", [
    ("mamba-ssm", {"ssm_cfg": {"layer": "Mamba2", "d_state": 8}},
     "unsupported Mamba variant: ssm_cfg.layer = 'Mamba2'"),
    ("mamba-ssm", {"rms_norm": False}, r"unsupported Mamba variant: LayerNorm \(rms_norm = false\)"),
    ("mamba-ssm", {"d_intermediate": 64}, r"an MLP in every block \(d_intermediate = 64\)"),
    ("mamba-ssm", {"attn_layer_idx": [1]}, r"attention layers \[1\]"),
    ("mamba-ssm", {"bidirectional": True}, r"unknown mamba-ssm config keys \['bidirectional'\]"),
    ("mamba-ssm", {"ssm_cfg": {"d_state": 8, "headdim": 64}}, r"unknown ssm_cfg keys \['headdim'\]"),
    ("mamba-ssm", {"ssm_cfg": {"d_state": 8, "expand": 1.5}}, "expand must be an integer, got 1.5"),
    ("hf", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("hf", {"intermediate_size": 48}, r"intermediate_size 48 != expand \* hidden_size"),
    ("hf", {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"]},
     "unsupported checkpoint .*model_type 'mamba2'"),
    ("hf", {"model_type": None, "architectures": None, "hidden_size": None}, "unknown checkpoint layout"),
], ids=["mamba2", "layernorm", "mlp", "attention", "unknown-key", "unknown-ssm-key", "float-expand", "gelu",
        "intermediate", "hf-mamba2", "unknown-layout"])
def test_bad_configs(tmp_path, layout, edit, match):
    path = exported(tmp_path, layout)
    data = {**read_config(path), **edit}
    write_config(path, {k: v for k, v in data.items() if v is not None})
    with pytest.raises(CheckpointError, match=match):
        momoe.from_pretrained(path)


def test_momoe_checkpoints_still_load(tmp_path):
    model = randomize(MambaLM(tiny(split=["in_proj"])))
    model.save_pretrained(str(tmp_path))
    assert detect_layout(read_config(tmp_path)) == "momoe"
    ids = tokens(64)
    assert torch.equal(logits(momoe.from_pretrained(str(tmp_path)), ids), logits(model, ids))


# ----------------------------------------------------------------------------- command line
def test_cli_convert_chain(tmp_path, capsys):
    model = randomize(MambaLM(tiny(tie_embeddings=False)))
    torch.save(mamba_ssm_tensors(model) | {"lm_head.weight": model.lm_head.weight.detach().clone()},
               tmp_path / "pytorch_model.bin")
    write_config(tmp_path, {"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"d_state": 8},
                            "tie_embeddings": False})
    chain = [(str(tmp_path), "hf"), (str(tmp_path / "hf"), "momoe"), (str(tmp_path / "momoe"), "mamba-ssm")]
    for src, to in chain:
        main(["convert", src, str(tmp_path / to), "--to", to])
        assert f"wrote {tmp_path / to} ({to} layout" in capsys.readouterr().out
    ids = tokens(64)
    for _, to in chain:
        assert torch.equal(logits(momoe.from_pretrained(str(tmp_path / to)), ids), logits(model, ids)), to


def test_cli_convert_errors(tmp_path):
    MambaLM(tiny(split=["x_proj"])).save_pretrained(str(tmp_path / "mom"))
    with pytest.raises(SystemExit, match="momoe convert: .*Mixture-of-Mamba"):
        main(["convert", str(tmp_path / "mom"), str(tmp_path / "out"), "--to", "hf"])
    write_config(tmp_path, {"hello": 1})
    with pytest.raises(SystemExit, match="momoe convert: .*unknown checkpoint layout"):
        main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "momoe"])
    with pytest.raises(SystemExit, match="SRC and DST must be different folders"):
        main(["convert", str(tmp_path / "mom"), str(tmp_path / "mom"), "--to", "momoe"])
    assert not os.path.exists(tmp_path / "out")
