"""Dense early-fusion transformer and Mixture-of-Transformers: the invariants MoT implies (identical
modality weights = dense, modalities use their own weights, global attention), decoding with the KV
cache = full forward, packed documents, causality, save -> load, training."""
import pytest
import torch

import momoe
from momoe.models import TransformerConfig, TransformerLM
from tests.models.helpers import assert_same_as_dense, batch, decode_in_pieces, randomize, train_on_modality_task
from tests.utils import assert_close

TOL = dict(atol=2e-5, rtol=2e-5)


def tiny(split=False, **kw) -> TransformerConfig:
    base = dict(vocab_size=64, d_model=32, n_layer=2, n_heads=4, n_kv_heads=2, d_ff=48, qk_norm=True,
                modalities=["text", "image", "speech"])
    base.update(kw)
    return TransformerConfig(modality_split=split, **base)


def test_identical_modality_weights_equal_dense():
    torch.manual_seed(0)
    dense = randomize(TransformerLM(tiny()))
    mot = momoe.upcycle(dense, tiny(split=True))
    ids, mod = batch(dense.config)
    assert_same_as_dense(dense, mot, ids, mod, TOL)
    counts = momoe.count_parameters(mot)
    assert counts["active_per_token"]["text"] == momoe.count_parameters(dense)["total"] < counts["total"]


def test_modalities_use_their_own_weights_and_attend_globally():
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny(split=True)))
    ids, _ = batch(model.config, B=1, L=10)
    mod = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 0]])
    before = model(ids, mod).logits
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.w2.weight[1].add_(0.5)  # image FFN only
    after = model(ids, mod).logits
    assert torch.equal(before[:, :4], after[:, :4])  # text before any image token: untouched
    assert not torch.allclose(before[:, 7:], after[:, 7:])  # text after image tokens sees them (global attention)


@pytest.mark.parametrize("split", [False, True], ids=["dense", "mot"])
def test_kv_cache_decoding_equals_forward(split):
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny(split)))
    ids, mod = batch(model.config, L=15)
    full = model(ids, mod).logits
    got, cache = decode_in_pieces(model, ids, mod)
    assert_close("cached", full, got, **TOL)
    assert cache.seen == 15


def test_generate_greedy():
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny(True)))
    ids, mod = batch(model.config, L=6)
    out = model.generate(ids, mod, max_new_tokens=4, new_modality=2)
    full_mod = torch.cat([mod, torch.full((2, 4), 2)], 1)
    assert torch.equal(model(out, full_mod).logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_packed_documents_and_causality():
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny(True)))
    ids, mod = batch(model.config, B=1, L=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    packed = model(ids, mod, seq_idx=seq_idx).logits
    assert_close("doc 0", model(ids[:, :5], mod[:, :5]).logits, packed[:, :5], **TOL)
    assert_close("doc 1", model(ids[:, 5:], mod[:, 5:]).logits, packed[:, 5:], **TOL)
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 3) % 64
    assert torch.equal(model(ids, mod).logits[:, :8], model(ids2, mod).logits[:, :8])


def test_save_load_and_bad_configs(tmp_path):
    model = randomize(TransformerLM(tiny(True, tie_embeddings=True)))
    model.save_pretrained(str(tmp_path))
    loaded = momoe.from_pretrained(str(tmp_path))
    ids, mod = batch(model.config)
    assert type(loaded) is TransformerLM and torch.equal(model(ids, mod).logits, loaded(ids, mod).logits)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        tiny(n_heads=5, n_kv_heads=None)
    with pytest.raises(ValueError, match="unknown TransformerConfig keys"):
        TransformerConfig.from_dict({"d_model": 8, "experts": 4})
    with pytest.raises((ValueError, RuntimeError), match="group_ids|modality"):
        model(ids, torch.full_like(mod, 5))


def test_training_lowers_loss():
    torch.manual_seed(0)
    first, out = train_on_modality_task(TransformerLM(tiny(True, vocab_size=48)), steps=150, L=40)
    assert out.loss.item() < 0.5 * first, (first, out.loss.item())


def test_post_norm_blocks():
    """norm_position 'post': every block is x + norm(attn(x)), then + norm(ffn(x)); decoding still equals
    the full forward."""
    torch.manual_seed(0)
    model = randomize(TransformerLM(tiny(norm_position="post")))
    ids, mod = batch(model.config, L=12)
    block, x = model.layers[0], model.embedding(ids)
    positions = torch.arange(12)
    h = x + block.attn_norm(block.attn(x, None, positions))
    expected = h + block.ffn_norm(block.ffn(h))
    assert_close("post-norm block", expected, block(x, mod, None, positions), **TOL)
    full = model(ids, mod).logits
    prefill = model(ids[:, :5], mod[:, :5], return_cache=True)
    steps = [model.step(ids[:, t], mod[:, t], prefill.cache) for t in range(5, 12)]
    assert_close("cached", full, torch.cat([prefill.logits, torch.stack(steps, 1)], 1), **TOL)
    with pytest.raises(ValueError, match="norm_position"):
        tiny(norm_position="sandwich")
