"""MoMa (modality-aware expert-choice MoE, optionally with mixture-of-depths): sparse upcycling from a
dense model, modalities using their own experts, causality and KV-cache decoding with causal routing,
save -> load, the auxiliary routers' training stage, training, parameter counts, config errors."""
import dataclasses

import pytest
import torch

import momoe
from momoe.models import MoMaConfig, MoMaLM, TransformerConfig, TransformerLM, config_from_dict
from tests.models.helpers import batch, decode_in_pieces, randomize, train_on_modality_task
from tests.models.test_transformer import TOL, tiny
from tests.utils import assert_close


MOMA_FIELDS = {f.name for f in dataclasses.fields(MoMaConfig)} - {f.name for f in dataclasses.fields(TransformerConfig)}


def tiny_moma(experts=(2, 3, 1), split=False, **kw) -> MoMaConfig:
    """The MoMa version of test_transformer's tiny dense config (same fields, so it upcycles from it)."""
    moma = {k: kw.pop(k) for k in MOMA_FIELDS & set(kw)}
    return MoMaConfig(**dataclasses.asdict(tiny(split, **kw)), experts_per_modality=list(experts), **moma)


def moma_and_mod(**kw) -> MoMaConfig:
    """MoMa with MoD on layers 1 and 3 of 4, routing image tokens only."""
    return tiny_moma(n_layer=4, mod_layers=[1, 3], mod_capacity=0.5, mod_modalities=["image"], **kw)


def expert_groups(model: MoMaLM, layer: int, kind: str):
    """The expert weights (w13 or w2) of a layer split by modality group."""
    return torch.split(getattr(model.layers[layer].ffn.experts, kind), model.config.experts_per_modality)


# ----------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("split", [False, True], ids=["from-dense", "from-mot"])
def test_upcycled_single_experts_equal_the_source(split):
    torch.manual_seed(0)
    dense = randomize(TransformerLM(tiny(split)))
    moma = momoe.upcycle(dense, tiny_moma([1, 1, 1], split))
    assert type(moma) is MoMaLM
    ids, mod = batch(dense.config)
    out_d, out_m = dense(ids, mod, labels=ids), moma(ids, mod, labels=ids)
    assert_close("logits", out_d.logits, out_m.logits, **TOL)
    assert_close("loss", out_d.loss, out_m.loss, **TOL)
    assert out_m.aux_loss.item() == 0.0 and out_m.router_stats == {}  # single experts: nothing routed


def test_upcycling_copies_the_ffn_into_every_expert():
    torch.manual_seed(0)
    dense = randomize(TransformerLM(tiny()))
    moma = momoe.upcycle(dense, tiny_moma([4, 4, 4]))
    source = dense.state_dict()
    for i in range(dense.config.n_layer):
        for kind in ("w13", "w2"):
            ffn = source[f"layers.{i}.ffn.{kind}.weight"][0]
            experts = getattr(moma.layers[i].ffn.experts, kind)
            assert experts.shape[0] == 12 and all(torch.equal(ffn, e) for e in experts), (i, kind)
    for name, value in moma.state_dict().items():
        if ".ffn.routers." in name or ".ffn.experts." in name:
            continue
        assert torch.equal(value, source[name]), name
    assert any(".ffn.routers." in name for name in moma.state_dict())


def test_upcycling_1t1i_to_4t4i_copies_each_groups_expert():
    torch.manual_seed(0)
    small = randomize(MoMaLM(tiny_moma([1, 1], modalities=["text", "image"])))
    large = momoe.upcycle(small, tiny_moma([4, 4], modalities=["text", "image"]))
    for i in range(small.config.n_layer):
        for kind in ("w13", "w2"):
            for source, target in zip(expert_groups(small, i, kind), expert_groups(large, i, kind)):
                assert target.shape[0] == 4 and all(torch.equal(source[0], e) for e in target), (i, kind)
    assert torch.equal(small.layers[0].attn.wq.weight, large.layers[0].attn.wq.weight)


def test_upcycling_needs_the_same_modalities():
    dense = TransformerLM(tiny())
    with pytest.raises(ValueError, match="cannot upcycle: source modalities"):
        momoe.upcycle(dense, tiny_moma([2, 2], modalities=["text", "image"]))


# ----------------------------------------------------------------------------- routing invariants


def test_modalities_use_their_own_experts():
    """Causal routing, so that no token's routing depends on later tokens (expert choice over the batch
    would let the changed image tokens move the text experts' choices). The early text tokens agree to
    rounding only: the later tokens' new decisions change how many rows each text expert's GEMM has."""
    torch.manual_seed(0)
    model = randomize(MoMaLM(tiny_moma([2, 3, 1])))
    ids, _ = batch(model.config, B=1, L=10)
    mod = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 0]])
    before = model(ids, mod, causal_routing=True).logits
    with torch.no_grad():
        for i in range(model.config.n_layer):
            expert_groups(model, i, "w2")[1].add_(0.5)  # the image experts only (a view of the bank)
    after = model(ids, mod, causal_routing=True).logits
    assert_close("text before the first image", before[:, :4], after[:, :4], **TOL)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("mod_layers", [[], [1]], ids=["moma", "moma-mod"])
def test_causal_routing_is_causal(mod_layers):
    torch.manual_seed(0)
    model = randomize(MoMaLM(tiny_moma([2, 3, 1], mod_layers=mod_layers, mod_capacity=0.5)))
    ids, mod = batch(model.config, L=14)
    ids2, mod2 = ids.clone(), mod.clone()
    for t in (13, 9):  # change a future token (and its modality), then one more
        ids2[:, t], mod2[:, t] = (ids2[:, t] + 7) % 64, (mod2[:, t] + 1) % 3
        a, b = model(ids, mod, causal_routing=True).logits, model(ids2, mod2, causal_routing=True).logits
        assert_close(f"logits before {t}", a[:, :t], b[:, :t], **TOL)  # to rounding: expert row counts change
        assert not torch.allclose(a[:, t:], b[:, t:], **TOL)


@pytest.mark.parametrize("config", [tiny_moma([2, 3, 1]), moma_and_mod(split=True),
                                    tiny_moma([3, 2, 1], expert_routing="token_choice", experts_per_token=2)],
                         ids=["moma", "moma-mod-image", "moma-token-choice"])
def test_kv_cache_decoding_equals_causal_forward(config):
    torch.manual_seed(0)
    model = randomize(MoMaLM(config))
    ids, mod = batch(model.config, L=15)
    full = model(ids, mod, causal_routing=True).logits
    got, cache = decode_in_pieces(model, ids, mod)
    assert_close("cached", full, got, **TOL)
    assert cache.seen == 15
    out = model.generate(ids[:, :6], mod[:, :6], max_new_tokens=4, new_modality=1)
    full_mod = torch.cat([mod[:, :6], torch.ones(2, 4, dtype=torch.long)], 1)
    assert torch.equal(model(out, full_mod, causal_routing=True).logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_save_load(tmp_path):
    torch.manual_seed(0)
    model = randomize(MoMaLM(moma_and_mod()))
    model.save_pretrained(str(tmp_path))
    loaded = momoe.from_pretrained(str(tmp_path))
    ids, mod = batch(model.config)
    assert type(loaded) is MoMaLM and loaded.config == model.config
    assert torch.equal(model(ids, mod).logits, loaded(ids, mod).logits)
    assert torch.equal(model(ids, mod, causal_routing=True).logits, loaded(ids, mod, causal_routing=True).logits)


# ----------------------------------------------------------------------------- training


def test_aux_router_stage_trains_only_the_aux_routers():
    torch.manual_seed(0)
    model = randomize(MoMaLM(tiny_moma([2, 3, 1], mod_layers=[1], mod_capacity=0.5)))
    ids, mod = batch(model.config, B=4, L=24)
    assert model(ids, mod).aux_loss.item() == 0.0  # only asked for in the second stage
    aux = model.freeze_for_aux_router_training()
    aux_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in aux} == {id(p) for n, p in model.named_parameters() if n in aux_names}
    assert any(".aux_router." in n for n in aux_names) and any(".predictor." in n for n in aux_names)
    main = {n: p.detach().clone() for n, p in model.named_parameters() if n not in aux_names}
    opt = torch.optim.AdamW(aux, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids, mod, train_aux_routers=True).aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name, p in model.named_parameters():
        if name in main:
            assert p.grad is None and torch.equal(p, main[name]), name


@pytest.mark.parametrize("mod_layers", [[], [1]], ids=["moma", "moma-mod"])
def test_training_lowers_loss(mod_layers):
    torch.manual_seed(0)
    model = MoMaLM(tiny_moma([2, 2, 1], vocab_size=48, mod_layers=mod_layers, mod_capacity=0.5))
    first, out = train_on_modality_task(model, steps=60, L=24)
    assert out.loss.item() < 0.5 * first, (first, out.loss.item())
    expected = {f"layers.{i}.experts.{m}" for i in range(2) for m in ("text", "image")}
    assert set(out.router_stats) == expected | {f"layers.{i}.depth" for i in mod_layers}


# ----------------------------------------------------------------------------- counts and configs


@pytest.mark.parametrize("cf", [1.0, 2.0])
def test_count_parameters(cf):
    dense = TransformerLM(tiny())
    model = MoMaLM(tiny_moma([4, 2, 1], capacity_factor=cf))
    counts = momoe.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    c = model.config
    per_expert_layers = 3 * c.d_model * c.ffn_dim * c.n_layer
    dense_total = momoe.count_parameters(dense)["total"]
    for name, e in zip(c.modalities, c.experts_per_modality):  # one dense FFN's worth per expert used
        extra = (cf - 1) * per_expert_layers + e * c.d_model * c.n_layer if e > 1 else 0  # + own router
        assert counts["active_per_token"][name] == dense_total + extra, name


@pytest.mark.parametrize("changes,match", [
    (dict(experts_per_modality=[4, 4]), "one entry per modality"),
    (dict(experts_per_modality=[4, 0, 4]), "at least one expert"),
    (dict(experts_per_modality=[4, 2, 1], capacity_factor=3.0), r"capacity_factor must be in \(0, 2\]"),
    (dict(capacity_factor=0.0), "capacity_factor must be in"),
    (dict(aux_router_hidden=0), "aux_router_hidden"),
    (dict(mod_layers=[2]), "mod_layers must be"),
    (dict(mod_layers=[-1]), "mod_layers must be"),
    (dict(mod_capacity=0.0), r"mod_capacity must be in \(0, 1\]"),
    (dict(mod_capacity=1.5), r"mod_capacity must be in \(0, 1\]"),
    (dict(mod_gate="tanh"), "unknown mod_gate"),
    (dict(mod_modalities=["video"]), "mod_modalities must be a non-empty subset"),
    (dict(mod_modalities=[]), "mod_modalities must be a non-empty subset"),
    (dict(expert_routing="hash"), "unknown expert_routing"),
    (dict(expert_routing="token_choice", experts_per_token=3), r"experts_per_token must be in \[1, 2\]"),
], ids=["epm-length", "zero-experts", "cf-above-group", "cf-zero", "aux-hidden", "mod-layer-out", "mod-layer-neg",
        "mod-capacity-zero", "mod-capacity-above-1", "mod-gate", "mod-modality-unknown", "mod-modality-empty",
        "expert-routing", "experts-per-token"])
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_moma().replace(**changes)


def test_config_dict_round_trip_and_unknown_keys():
    config = moma_and_mod()
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MoMaConfig keys"):
        MoMaConfig.from_dict({**config.to_dict(), "num_experts": 8})
    with pytest.raises(ValueError, match="model_type 'transformer', not 'moma'"):
        MoMaConfig.from_dict(tiny().to_dict())


def test_packed_rows_route_only_real_tokens():
    """Packed documents add no padding: expert choice sees exactly the batch's tokens of each modality, and
    the loss has no target across a document boundary."""
    torch.manual_seed(0)
    model = randomize(MoMaLM(tiny_moma([2, 3, 1])))
    ids, mod = batch(model.config, B=2, L=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [2] * 12])
    out = model(ids, mod, labels=ids, seq_idx=seq_idx)
    counts = torch.bincount(mod.reshape(-1), minlength=3)
    for m, (name, experts) in enumerate(zip(["text", "image"], [2, 3])):
        routed = out.router_stats[f"layers.0.experts.{name}"].tokens_per_expert
        assert routed.tolist() == [-(-int(counts[m]) // experts)] * experts
    labels = ids.clone()
    labels[0, 5] = -100  # the first token of document 1 is not a target of document 0's last token
    assert torch.equal(out.loss, model(ids, mod, labels=labels, seq_idx=seq_idx).loss)
