"""Mixture-of-Recursions: with every token at every step it is the weight-tied deep transformer; a token
a step does not select passes it unchanged; causal routing is causal; decoding with either KV strategy
equals the full forward; save -> load; packed documents; training; bad configs and inputs."""
import pytest
import torch

import momoe
from momoe.models.mor import MoRConfig, MoRLM
from momoe.models.transformer import TransformerLM
from tests.models.helpers import batch, decode_in_pieces, randomize, train_on_modality_task
from tests.utils import assert_close

TOL = dict(atol=2e-5, rtol=2e-5)
VARIANTS = [("expert-choice", "recursion-wise"), ("expert-choice", "recursive-sharing"),
            ("token-choice", "recursion-wise"), ("token-choice", "recursive-sharing")]
VARIANT_IDS = ["expert-cache", "expert-share", "token-cache", "token-share"]


def tiny(**kw) -> MoRConfig:
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, qk_norm=True, tie_embeddings=False,
                modalities=["text", "image", "speech"], num_recursions=3, recursion_layers=2)
    base.update(kw)
    return MoRConfig(**base)


def model_for(router="expert-choice", kv="recursion-wise", seed=0, **kw) -> MoRLM:
    torch.manual_seed(seed)
    return randomize(MoRLM(tiny(router=router, kv_strategy=kv, **kw)), seed=seed)


def weight_tied_reference(model: MoRLM, ids: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """The MoR forward written as a plain deep transformer: a TransformerLM with one layer per application
    of a shared layer, all copied from the MoR weights, run on every token (no gathering, no routing),
    the recursion steps combined as h + g_r * block(h)."""
    c = model.config
    k = c.recursion_layers
    dense = TransformerLM(c.layer_config())
    state = {"embedding.weight": model.embedding.weight, "norm_f.weight": model.norm_f.weight,
             "lm_head.weight": model.lm_head.weight}
    sources = [model.first] + [model.recursion.layers[i] for r in range(c.num_recursions) for i in range(k)] + [model.last]
    for j, layer in enumerate(sources):
        state.update({f"layers.{j}.{name}": p for name, p in layer.state_dict().items()})
    dense.load_state_dict(state)
    positions = torch.arange(ids.shape[1])
    x = dense.layers[0](dense.embedding(ids), mod, None, positions)
    for r in range(c.num_recursions):
        gate = c.alpha * torch.sigmoid(x @ model.recursion.router.weight[r])
        y = x
        for layer in dense.layers[1 + r * k:1 + (r + 1) * k]:
            y = layer(y, mod, None, positions)
        x = x + gate[..., None] * y
    x = dense.layers[-1](x, mod, None, positions)
    return dense.lm_head(dense.norm_f(x, mod))


@pytest.mark.parametrize("causal", [False, True], ids=["batch-routing", "causal-routing"])
def test_capacity_one_equals_the_weight_tied_deep_transformer(causal):
    model = model_for(capacity=[1.0, 1.0, 1.0])
    ids, mod = batch(model.config)
    out = model(ids, mod, causal_routing=causal)
    assert_close("logits", weight_tied_reference(model, ids, mod), out.logits, **TOL)
    assert (out.router_stats["recursion.depth"] == 3).all()
    assert out.router_stats["recursion"].tokens_per_expert.tolist() == [ids.numel()] * 3


def recursion_io(model: MoRLM, ids, mod):
    """The recursion's input and output hidden states (B, L, D), and the output's depths."""
    seen = {}
    hook = model.recursion.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    try:
        model(ids, mod)
    finally:
        hook.remove()
    return seen["x"], seen["out"].hidden, seen["out"].depth


def test_unselected_tokens_pass_a_step_unchanged():
    ids, mod = batch(tiny(), B=3, L=12)
    # one step that keeps half of every sequence: the other half leaves the recursion as it came in
    x, h, depth = recursion_io(model_for(num_recursions=1, capacity=[0.5]), ids, mod)
    skipped = depth == 0
    assert skipped.sum(1).tolist() == [6, 6, 6]
    assert torch.equal(h[skipped], x[skipped]) and not torch.allclose(h[~skipped], x[~skipped])
    # two steps, the second keeping a quarter: the others' states are exactly those after one step
    two = model_for(num_recursions=2, capacity=[1.0, 0.25])
    one = MoRLM(tiny(num_recursions=1, capacity=[1.0]))
    state = two.state_dict()
    state["recursion.router.weight"] = state["recursion.router.weight"][:1]
    one.load_state_dict(state)
    _, h2, depth2 = recursion_io(two, ids, mod)
    _, h1, _ = recursion_io(one, ids, mod)
    assert (depth2 >= 1).all() and (depth2 == 2).sum(1).tolist() == [3, 3, 3]
    assert torch.equal(h2[depth2 == 1], h1[depth2 == 1])
    assert not torch.allclose(h2[depth2 == 2], h1[depth2 == 2])


def test_expert_choice_steps_are_nested_per_sequence():
    model = model_for(num_recursions=3, capacity=[1.0, 0.6, 0.3])
    ids, mod = batch(model.config, B=2, L=10)
    out = model(ids, mod)
    depth = out.router_stats["recursion.depth"]
    assert [(depth > r).sum(1).tolist() for r in range(3)] == [[10, 10], [6, 6], [3, 3]]
    assert_close("depth histogram", torch.tensor([0.0, 0.4, 0.3, 0.3]),
                 out.router_stats["recursion"].fraction_routed_to, **TOL)


@pytest.mark.parametrize("router,kv", VARIANTS, ids=VARIANT_IDS)
def test_causal_routing_is_causal(router, kv):
    model = model_for(router, kv)
    ids, mod = batch(model.config, B=2, L=16)
    ids2 = ids.clone()
    ids2[:, 9:] = (ids2[:, 9:] + 7) % 64
    a, b = model(ids, mod, causal_routing=True), model(ids2, mod, causal_routing=True)
    assert torch.equal(a.logits[:, :9], b.logits[:, :9])
    assert torch.equal(a.router_stats["recursion.depth"][:, :9], b.router_stats["recursion.depth"][:, :9])
    depths = a.router_stats["recursion.depth"]
    assert len(depths.unique()) > 1, "the test should route tokens to different depths"


@pytest.mark.parametrize("router,kv", VARIANTS, ids=VARIANT_IDS)
def test_decoding_with_the_cache_equals_the_full_forward(router, kv):
    model = model_for(router, kv)
    ids, mod = batch(model.config, B=2, L=15)
    full = model(ids, mod, causal_routing=True).logits
    got, cache = decode_in_pieces(model, ids, mod)
    assert_close("cached", full, got, **TOL)
    assert cache.seen == 15 and len(cache.steps) == (1 if kv == "recursive-sharing" else 3)
    if kv == "recursion-wise":  # each step caches the keys of the tokens active at that step only
        depth = model(ids, mod, causal_routing=True).router_stats["recursion.depth"]
        for r, step in enumerate(cache.steps):
            assert step.valid.sum(1).tolist() == (depth > r).sum(1).tolist()
            assert step.layers[0].k.shape[2] == step.valid.shape[1]
    out = model.generate(ids[:, :6], mod[:, :6], max_new_tokens=4, new_modality=1)
    full_mod = torch.cat([mod[:, :6], torch.ones(2, 4, dtype=mod.dtype)], 1)
    assert torch.equal(model(out, full_mod, causal_routing=True).logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_recursive_sharing_reuses_the_first_steps_keys():
    """Same weights, all tokens at every step: sharing the first step's keys changes the later steps
    (the keys are computed once instead of per step), and only them."""
    caching = model_for(kv="recursion-wise", capacity=[1.0, 1.0, 1.0])
    sharing = MoRLM(tiny(kv_strategy="recursive-sharing", capacity=[1.0, 1.0, 1.0]))
    sharing.load_state_dict(caching.state_dict())
    ids, mod = batch(caching.config, B=2, L=10)
    assert not torch.allclose(caching(ids, mod).logits, sharing(ids, mod).logits, atol=1e-4)
    one_step = dict(num_recursions=1, capacity=[1.0])
    a, b = MoRLM(tiny(**one_step)), MoRLM(tiny(kv_strategy="recursive-sharing", **one_step))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(ids, mod).logits, b(ids, mod).logits)


@pytest.mark.parametrize("router,kv", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["batch-routing", "causal-routing"])
def test_packed_documents_equal_separate_documents(router, kv, causal):
    model = model_for(router, kv)
    ids, mod = batch(model.config, B=1, L=16)
    seq_idx = torch.tensor([[0] * 6 + [1] * 10])
    packed = model(ids, mod, seq_idx=seq_idx, causal_routing=causal)
    for name, span in (("doc 0", slice(0, 6)), ("doc 1", slice(6, 16))):
        alone = model(ids[:, span], mod[:, span], causal_routing=causal)
        assert_close(name, alone.logits, packed.logits[:, span], **TOL)
        assert torch.equal(alone.router_stats["recursion.depth"], packed.router_stats["recursion.depth"][:, span])


def test_router_gradients_and_aux_loss():
    for router in ("expert-choice", "token-choice"):
        model = model_for(router)
        ids, mod = batch(model.config)
        out = model(ids, mod, labels=ids)
        assert out.aux_loss.item() > 0
        (out.loss + out.aux_loss).backward()
        assert next(model.recursion.router.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize("router,kv", VARIANTS, ids=VARIANT_IDS)
def test_bf16_autocast(router, kv):
    """bf16 logits follow fp32 up to the first token whose routing decision a near-tie flips (routing is
    discrete; with causal routing, earlier positions cannot notice)."""
    model = model_for(router, kv)
    ids, mod = batch(model.config)
    ref = model(ids, mod, labels=ids, causal_routing=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mod, labels=ids, causal_routing=True)
        out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    flipped = ref.router_stats["recursion.depth"] != out.router_stats["recursion.depth"]
    for b in range(ids.shape[0]):
        same = int(flipped[b].float().argmax()) if flipped[b].any() else ids.shape[1]
        assert_close(f"bf16 logits, row {b}", ref.logits[b, :same], out.logits[b, :same], atol=5e-2, rtol=5e-2)


def test_save_load_and_card(tmp_path):
    model = model_for(tie_embeddings=True, causal_router="aux-router")
    model.save_pretrained(str(tmp_path))
    loaded = momoe.from_pretrained(str(tmp_path))
    ids, mod = batch(model.config)
    assert type(loaded) is MoRLM and loaded.config == model.config
    assert torch.equal(model(ids, mod).logits, loaded(ids, mod).logits)
    assert torch.equal(model(ids, mod, causal_routing=True).logits, loaded(ids, mod, causal_routing=True).logits)
    cfg = momoe.load_card("mor-360m-expert-r3")
    assert isinstance(cfg, MoRConfig) and cfg.num_layers == 32 and cfg.capacities == [1.0, 2 / 3, 1 / 3]


@pytest.mark.parametrize("router", ["expert-choice", "token-choice"])
def test_training_lowers_loss(router):
    torch.manual_seed(0)
    model = MoRLM(tiny(router=router, vocab_size=48, num_recursions=2, recursion_layers=1))
    first, out = train_on_modality_task(model, steps=60, L=40)
    assert out.loss.item() < 0.5 * first, (first, out.loss.item())


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="must not increase"):
        tiny(capacity=[1.0, 0.3, 0.6])
    with pytest.raises(ValueError, match="one value per recursion step"):
        tiny(capacity=[1.0, 0.5])
    with pytest.raises(ValueError, match="token-choice routing has none"):
        tiny(router="token-choice", capacity=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="capacity\\[0\\] = 1"):
        tiny(kv_strategy="recursive-sharing", capacity=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="unknown MoRConfig.sharing"):
        tiny(sharing="sequence")
    with pytest.raises(ValueError, match="unknown MoRConfig.router"):
        tiny(router="random")
    with pytest.raises(ValueError, match="num_recursions must be >= 1"):
        tiny(num_recursions=0)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        tiny(n_heads=5, n_kv_heads=None)
    with pytest.raises(ValueError, match="unknown MoRConfig keys"):
        MoRConfig.from_dict({"d_model": 8, "recursions": 3})
    model = model_for()
    ids, mod = batch(model.config)
    with pytest.raises(ValueError, match="modality_ids must be in"):
        model(ids, torch.full_like(mod, 5))
    with pytest.raises(ValueError, match="cannot be combined"):
        model(ids, mod, seq_idx=torch.zeros_like(ids), return_cache=True)
    cycle = MoRLM(tiny(sharing="cycle"))
    assert cycle.first is None and cycle.config.num_layers == 6
    assert cycle(ids, mod).logits.shape == (*ids.shape, 64)
