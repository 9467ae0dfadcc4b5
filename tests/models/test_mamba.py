"""Mamba LM and Mixture-of-Mamba: against a plain-PyTorch reference of the Mamba block, and the
invariants the Mixture-of-Mamba paper implies (identical modality experts = dense, upcycling,
decoding = forward, no state across documents, causality, save -> load)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import momoe
from momoe.checkpoint import CheckpointError, load_weights, save_weights
from momoe.models import MambaConfig, MambaLM
from momoe.ops.selective_scan import naive
from tests.models.helpers import assert_same_as_dense, batch, randomize, train_on_modality_task
from tests.utils import assert_close

ALL = ["in_proj", "x_proj", "dt_proj", "out_proj"]
TOL = dict(atol=2e-5, rtol=2e-5)


def tiny(split=(), split_ssm=False, **kw) -> MambaConfig:
    base = dict(vocab_size=64, d_model=32, n_layer=2, d_state=8, modalities=["text", "image", "speech"])
    base.update(kw)
    return MambaConfig(split=list(split), split_ssm=split_ssm, **base)


# ----------------------------------------------------------------------------- reference
def per_token_linear(x, weight, bias, mod):
    """x: (B, L, K); weight: (M, N, K); each token uses weight[mod] (M = 1: shared)."""
    idx = mod if weight.shape[0] > 1 else torch.zeros_like(mod)
    y = torch.einsum("blnk,blk->bln", weight[idx], x)
    return y if bias is None else y + bias[idx]


def reference_forward(model: MambaLM, ids, mod):
    """The Mamba block spelled out (mamba-ssm's slow path), with per-token parameter selection."""
    cfg = model.config
    x = model.embedding.weight[ids]
    for layer in model.layers:
        mx = layer.mixer
        h = layer.norm(x)
        xz = per_token_linear(h, mx.in_proj.weight, mx.in_proj.bias, mod)
        u, z = xz.chunk(2, dim=-1)
        u = F.conv1d(u.transpose(1, 2), mx.conv1d.weight, mx.conv1d.bias, padding=cfg.d_conv - 1,
                     groups=mx.d_inner)[..., : ids.shape[1]]
        u = F.silu(u)
        x_dbl = per_token_linear(u.transpose(1, 2), mx.x_proj.weight, None, mod)
        dt_low, B_, C_ = torch.split(x_dbl, [mx.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt = per_token_linear(dt_low, mx.dt_proj.weight, None, mod)
        A = -torch.exp(mx.A_log.float())
        M = cfg.num_modalities
        y = naive.selective_scan(
            u, dt.transpose(1, 2), A.expand(M, -1, -1), B_.transpose(1, 2), C_.transpose(1, 2),
            D=mx.D.expand(M, -1), z=z.transpose(1, 2), delta_bias=mx.dt_bias.expand(M, -1),
            delta_softplus=True, modality=mod,
        )
        x = x + per_token_linear(y.transpose(1, 2), mx.out_proj.weight, mx.out_proj.bias, mod)
    return model.lm_head(model.norm_f(x))


@pytest.mark.parametrize("split,split_ssm", [((), False), (ALL, False), (["in_proj", "out_proj"], False),
                                             (ALL, True), ((), True)],
                         ids=["dense", "mom", "mom-in-out", "mom-ssm", "ssm-only"])
def test_matches_reference(split, split_ssm):
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(split, split_ssm, bias=True)))
    ids, mod = batch(model.config)
    assert_close("logits", reference_forward(model, ids, mod), model(ids, mod).logits, **TOL)


# ----------------------------------------------------------------------------- Mixture-of-Mamba invariants
@pytest.mark.parametrize("split_ssm", [False, True])
def test_identical_experts_equal_dense(split_ssm):
    """Every modality's parameters equal to the dense ones: same logits, and each dense gradient is
    the sum of the per-modality gradients."""
    torch.manual_seed(0)
    dense = randomize(MambaLM(tiny()))
    mom = momoe.upcycle(dense, tiny(ALL, split_ssm))
    ids, mod = batch(dense.config)
    assert_same_as_dense(dense, mom, ids, mod, TOL)


def test_modalities_use_their_own_parameters():
    """Changing image experts changes only what image tokens (and what follows them) see."""
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(ALL)))
    ids, _ = batch(model.config, B=1, L=12)
    mod = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0]])
    before = model(ids, mod).logits
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.in_proj.weight[1].add_(0.5)
    after = model(ids, mod).logits
    assert torch.equal(before[:, :4], after[:, :4])  # text tokens before the first image token
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_upcycled_model_equals_dense_and_counts():
    dense = randomize(MambaLM(tiny()))
    mom = momoe.upcycle(dense, tiny(ALL))
    ids, mod = batch(dense.config)
    assert_close("logits", dense(ids, mod).logits, mom(ids, mod).logits, **TOL)
    counts_d, counts_m = momoe.count_parameters(dense), momoe.count_parameters(mom)
    assert counts_m["total"] > counts_d["total"]
    assert counts_m["active_per_token"] == {m: counts_d["total"] for m in dense.config.modalities}
    with pytest.raises(ValueError, match="cannot upcycle"):
        momoe.upcycle(dense, tiny(ALL, d_model=48))


# ----------------------------------------------------------------------------- decoding and packing
@pytest.mark.parametrize("split,split_ssm", [((), False), (ALL, False), (ALL, True)], ids=["dense", "mom", "mom-ssm"])
def test_step_and_chunked_prefill_equal_forward(split, split_ssm):
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(split, split_ssm)))
    ids, mod = batch(model.config, L=17)
    full = model(ids, mod).logits
    cache = model.empty_cache(2)
    steps = torch.stack([model.step(ids[:, t], mod[:, t], cache) for t in range(17)], dim=1)
    assert_close("step", full, steps, **TOL)
    first = model(ids[:, :6], mod[:, :6], return_cache=True)
    second = model(ids[:, 6:13], mod[:, 6:13], cache=first.cache, return_cache=True)
    third = model(ids[:, 13:], mod[:, 13:], cache=second.cache)
    assert_close("chunked", full, torch.cat([first.logits, second.logits, third.logits], 1), **TOL)
    # decoding continues a chunked prefill
    prefill = model(ids[:, :10], mod[:, :10], return_cache=True)
    assert prefill.cache.seen == 10
    assert_close("prefill+step", full[:, 10], model.step(ids[:, 10], mod[:, 10], prefill.cache), **TOL)


def test_generate_greedy_matches_argmax_of_forward():
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(ALL)))
    ids, mod = batch(model.config, L=7)
    out = model.generate(ids, mod, max_new_tokens=5, new_modality=1)
    assert out.shape == (2, 12) and torch.equal(out[:, :7], ids)
    full_mod = torch.cat([mod, torch.ones(2, 5, dtype=mod.dtype)], 1)
    logits = model(out, full_mod).logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])


def test_packed_documents_do_not_share_state():
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(ALL)))
    ids, mod = batch(model.config, B=2, L=16)
    seq_idx = torch.tensor([[0] * 5 + [1] * 9 + [2] * 2, [7] * 16])
    out = model(ids, mod, labels=ids, seq_idx=seq_idx)
    for row, (a, b) in [(0, (0, 5)), (0, (5, 14)), (0, (14, 16)), (1, (0, 16))]:
        alone = model(ids[row : row + 1, a:b], mod[row : row + 1, a:b]).logits[0]
        assert_close(f"doc {row}:{a}-{b}", alone, out.logits[row, a:b], **TOL)
    # the loss never predicts a document's first token from the previous document
    n_targets = (5 - 1) + (9 - 1) + (2 - 1) + (16 - 1)
    per_doc = torch.cat([F.cross_entropy(model(ids[r : r + 1, a:b], mod[r : r + 1, a:b]).logits[0, :-1],
                                         ids[r, a + 1 : b], reduction="sum")[None]
                         for r, (a, b) in [(0, (0, 5)), (0, (5, 14)), (0, (14, 16)), (1, (0, 16))]])
    assert_close("loss", per_doc.sum() / n_targets, out.loss, **TOL)
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, mod, seq_idx=torch.tensor([[1] * 8 + [0] * 8] * 2))


def test_causal():
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(ALL)))
    ids, mod = batch(model.config, L=14)
    ids2, mod2 = ids.clone(), mod.clone()
    ids2[:, 9:] = (ids2[:, 9:] + 1) % model.config.vocab_size
    mod2[:, 9:] = (mod2[:, 9:] + 1) % 3
    assert torch.equal(model(ids, mod).logits[:, :9], model(ids2, mod2).logits[:, :9])


def test_loss_per_modality():
    model = MambaLM(tiny(ALL))
    ids, mod = batch(model.config, L=30)
    out = model(ids, mod, labels=ids)
    target_mod = mod[:, 1:].reshape(-1)
    per_token = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
    for m, name in enumerate(model.config.modalities):
        assert_close(name, per_token[target_mod == m].mean(), out.loss_per_modality[name], atol=1e-6, rtol=1e-6)
    assert_close("loss", per_token.mean(), out.loss, atol=1e-6, rtol=1e-6)


def test_bf16_autocast_and_bf16_weights():
    torch.manual_seed(0)
    model = randomize(MambaLM(tiny(ALL)))
    ids, mod = batch(model.config)
    ref = model(ids, mod).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mod, labels=ids)
    out.loss.backward()
    assert_close("autocast", ref, out.logits.float(), atol=0.15, rtol=0.1)
    model_bf16 = MambaLM(tiny(ALL)).to(torch.bfloat16)
    model_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert_close("bf16", ref, model_bf16(ids, mod).logits.float(), atol=0.15, rtol=0.1)


def test_bad_inputs():
    model = MambaLM(tiny(ALL))
    ids, mod = batch(model.config)
    with pytest.raises((ValueError, RuntimeError), match="group_ids|modality"):
        model(ids, torch.full_like(mod, 3))
    with pytest.raises(ValueError, match=r"modality_ids must be in \[0, 3\)"):
        MambaLM(tiny())(ids, torch.full_like(mod, -1))
    with pytest.raises(ValueError, match="must match"):
        model(ids, mod[:, :-1])
    with pytest.raises(ValueError, match="unknown MambaConfig keys"):
        MambaConfig.from_dict({"d_model": 8, "n_layers": 2})
    with pytest.raises(ValueError, match="unknown projections"):
        tiny(["in_proj", "conv1d"])


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("split", [(), ALL], ids=["dense", "mom"])
def test_save_load_identical(tmp_path, split):
    model = randomize(MambaLM(tiny(split)))
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = momoe.from_pretrained(str(tmp_path))
    ids, mod = batch(model.config)
    assert type(loaded) is MambaLM and loaded.config == model.config
    assert torch.equal(model(ids, mod).logits, loaded(ids, mod).logits)
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_bad_checkpoints(tmp_path):
    model = MambaLM(tiny(ALL))
    model.save_pretrained(str(tmp_path))
    weights = str(tmp_path / "model.safetensors")
    state = load_weights(weights)

    def expect(state_dict, match):
        save_weights(state_dict, weights)
        with pytest.raises(CheckpointError, match=match):
            momoe.from_pretrained(str(tmp_path))

    expect({k: v for k, v in state.items() if k != "layers.1.mixer.A_log"}, "missing tensors.*layers.1.mixer.A_log")
    expect({**state, "layers.0.mixer.D": torch.zeros(1, 5)}, r"layers.0.mixer.D has shape \(1, 5\)")
    expect({**state, "norm_f.weight": torch.zeros(32, dtype=torch.int32)}, "norm_f.weight has dtype torch.int32")
    expect({**state, "extra": torch.zeros(1)}, "unexpected tensors.*extra")
    with open(weights, "wb") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        momoe.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        momoe.from_pretrained(str(tmp_path))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves the previous checkpoint intact and no temp files behind."""
    model = MambaLM(tiny())
    model.save_pretrained(str(tmp_path))
    before = (tmp_path / "model.safetensors").read_bytes()
    import momoe.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        randomize(model).save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- training
def test_training_lowers_loss():
    torch.manual_seed(0)
    first, out = train_on_modality_task(MambaLM(tiny(ALL, vocab_size=48)), steps=200, L=48)
    assert out.loss.item() < 0.5 * first, (first, out.loss.item())
    assert math.isfinite(out.loss.item()) and set(out.loss_per_modality) == {"text", "image", "speech"}
