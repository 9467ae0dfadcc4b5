"""γ-MoD's ARank tooling: the attention maps it ranks are the ones the forward uses, layers are chosen
by lowest rank within the allowed range, and a converted model keeps every dense weight."""
import pytest
import torch

from momoe.models import TransformerConfig, TransformerLM
from momoe.models.transformer.attention_rank import attention_rank, choose_mod_layers, convert_to_mod
from tests.models.helpers import batch, randomize
from tests.utils import assert_close


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(vocab_size=64, d_model=32, n_layer=4, n_heads=4, n_kv_heads=2, qk_norm=True,
                             modalities=["text", "image"], **kw)


def test_attention_probs_reproduce_the_attention_output():
    torch.manual_seed(0)
    attn = TransformerLM(tiny()).layers[0].attn
    x, positions = torch.randn(2, 9, 32), torch.arange(9)
    probs = attn.attention_probs(x, None, positions)  # (B, H, L, L)
    assert_close("rows sum to 1", probs.sum(-1), torch.ones(2, 4, 9), atol=1e-6, rtol=0)
    assert torch.all(probs.triu(1) == 0)  # causal
    _, _, v = attn.project_qkv(x, None, positions)
    y = (probs @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(2, 9, 32)
    assert_close("attention output", attn.wo(y), attn(x, None, positions), atol=1e-5, rtol=1e-5)


def test_attention_rank_per_layer():
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny()))
    ids, mod = batch(model.config, B=2, L=12)
    ranks = attention_rank(model, ids, mod)
    assert len(ranks) == 4 and all(1 <= r <= 12 for r in ranks)
    x = model.embedding(ids)
    probs = model.layers[0].attn.attention_probs(model.layers[0].attn_norm(x), None, torch.arange(12))
    assert ranks[0] == pytest.approx(torch.linalg.matrix_rank(probs, rtol=1e-3).float().mean().item())


def test_choose_mod_layers():
    ranks = [9.0, 3.0, 5.0, 3.0, 1.0, 7.0]
    assert choose_mod_layers(ranks, 2) == [3, 4]  # ties go to the deeper layer
    assert choose_mod_layers(ranks, 3, keep_first=2, keep_last=1) == [2, 3, 4]
    with pytest.raises(ValueError, match="cannot choose"):
        choose_mod_layers(ranks, 4, keep_first=3)


def test_convert_to_mod_keeps_the_dense_weights():
    torch.manual_seed(0)
    dense = randomize(TransformerLM(tiny()))
    mod = convert_to_mod(dense, [1, 2], mod_capacity=0.5, mod_weighting="ffn", mod_shared_router=True)
    assert mod.config.mod_layers == [1, 2] and mod.layers[1].depth.router is mod.layers[2].depth.router
    state = mod.state_dict()
    for name, t in dense.state_dict().items():
        assert torch.equal(state[name], t), name
    ids, m = batch(dense.config)
    assert torch.isfinite(mod(ids, m, labels=ids).loss)
