"""FLOPs per token from a config: the dense transformer's closed form, and what MoMa, MoD, MoR and Mamba
change relative to it."""
import pytest
import torch

import momoe
from momoe.models import MambaConfig, MoMaConfig, MoRConfig, TransformerConfig

L = 64
BASE = dict(vocab_size=100, d_model=32, n_layer=4, n_heads=4, d_ff=48, modalities=["text", "image"])


def dense_forward(D=32, F=48, layers=4, V=100, kv_dim=32, seq_len=L) -> float:
    per_layer = 2 * D * (2 * D + 2 * kv_dim) + 2 * 2 * D * (seq_len + 1) / 2 + 2 * 3 * D * F
    return layers * per_layer + 2 * D * V


def test_dense_transformer_closed_form():
    flops = momoe.flops_per_token(TransformerConfig(**BASE), L)
    assert flops == {"text": pytest.approx(3 * dense_forward()), "image": pytest.approx(3 * dense_forward())}
    gqa = momoe.flops_per_token(TransformerConfig(n_kv_heads=2, **BASE), L)["text"]
    assert gqa == pytest.approx(3 * dense_forward(kv_dim=16))


def test_moma_expert_choice_matches_dense_plus_routers():
    cfg = MoMaConfig(experts_per_modality=[4, 1], **BASE)
    flops = momoe.flops_per_token(cfg, L)
    assert flops["text"] == pytest.approx(3 * (dense_forward() + 4 * 2 * 32 * 4))  # + a 4-expert router per layer
    assert flops["image"] == pytest.approx(3 * dense_forward())  # one expert: no router
    tc = momoe.flops_per_token(cfg.replace(expert_routing="token_choice", experts_per_token=2), L)["text"]
    assert tc == pytest.approx(3 * (dense_forward() + 4 * (2 * 32 * 4 + 2 * 3 * 32 * 48)))  # two experts per token


def test_mod_scales_the_routed_layers():
    cfg = TransformerConfig(mod_layers=[1, 3], mod_capacity=0.25, mod_modalities=["image"], **BASE)
    flops = momoe.flops_per_token(cfg, L)
    assert flops["text"] == pytest.approx(3 * dense_forward())  # text is never routed
    proj, core, ffn = 2 * 32 * 128, 2 * 2 * 32 * (L + 1) / 2, 2 * 3 * 32 * 48
    routed = 2 * 32 + 0.25 * (proj + ffn) + 0.25 ** 2 * core
    assert flops["image"] == pytest.approx(3 * (dense_forward(layers=2) + 2 * routed))


def test_mor_with_full_capacity_is_the_deep_transformer_plus_routers():
    kw = dict(vocab_size=100, d_model=32, n_heads=4, n_kv_heads=4, d_ff=48, tie_embeddings=False)
    mor = MoRConfig(num_recursions=3, recursion_layers=2, capacity=[1.0, 1.0, 1.0], **kw)
    assert momoe.flops_per_token(mor, L)["text"] == pytest.approx(3 * (dense_forward(layers=8) + 3 * 2 * 32))
    fewer = MoRConfig(num_recursions=3, recursion_layers=2, **kw)  # capacities 1, 2/3, 1/3
    assert momoe.flops_per_token(fewer, L)["text"] < momoe.flops_per_token(mor, L)["text"]
    shared = fewer.replace(kv_strategy="recursive-sharing")
    assert momoe.flops_per_token(shared, L)["text"] > momoe.flops_per_token(fewer, L)["text"]


def test_mamba_is_about_six_flops_per_parameter():
    cfg = MambaConfig(vocab_size=1000, d_model=256, n_layer=4, modalities=["text"])
    with torch.device("meta"):
        params = momoe.count_parameters(momoe.build_model(cfg))["total"]  # tied: the embedding is the LM head
    assert momoe.flops_per_token(cfg, L)["text"] == pytest.approx(6 * params, rel=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        momoe.flops_per_token(TransformerConfig(**BASE), 0)
    with pytest.raises(ValueError, match="no zoo card"):
        momoe.flops_per_token("no-such-card", 16)
