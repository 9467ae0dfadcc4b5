"""Expert parallelism over 2 ranks (and a 4-rank dp x ep mesh) against the single-process MoMa."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import momoe
from momoe.distributed import (apply_expert_parallel, consolidate, gradient_sync, init_mesh, local_expert_blocks,
                               save_distributed, spawn, unwrap_model, wrap_model)
from momoe.distributed.expert_parallel import _slot_of_expert, expert_parallel_modules
from tests.distributed.helpers import (TOL, WORLD, distributed_step, expert_rows, global_batches, make_model,
                                       moma_config, optimizer, rank_rows, step)
from tests.utils import assert_close

CONFIGS = {
    "expert-choice": moma_config(),
    "expert-choice-cf1.5-3-groups": moma_config(modalities=["text", "image", "speech"], experts_per_modality=[2, 4, 2],
                                                capacity_factor=1.5),
    "token-choice-top2": moma_config(expert_routing="token_choice", experts_per_token=2),
    # MoMa + MoD: layer 1 processes half of each row's tokens, its experts choose among those
    "expert-choice-mod": moma_config(mod_layers=[1], mod_capacity=0.5),
}
TRAIN_STEPS = 3
TRAIN_STRATEGIES = ("ep", "fsdp")
SKEWED = "expert-choice-cf1.5-3-groups"


def _batch(config: dict, skewed: bool):
    """The global batch; skewed: no speech token anywhere and only text on rank 1 (empty groups, empty
    all_to_all splits)."""
    ids, mod = global_batches(config, 1)[0]
    if skewed:
        mod = mod % 2
        mod[mod.shape[0] // WORLD:] = 0
    return ids, mod


def _forward_backward(config: dict, causal: bool, skewed: bool = False):
    """Rank side: this rank's logits, its loss, and the gradients of (loss / world) of every parameter."""
    model = apply_expert_parallel(make_model(config), dist.group.WORLD)
    ids, mod = (rank_rows(t) for t in _batch(config, skewed))
    out = model(ids, mod, labels=ids, causal_routing=causal)
    (out.loss / dist.get_world_size()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _aux_router_losses(config: dict):
    """Rank side, on the skewed batch (unequal tokens per modality on the ranks): the auxiliary routers'
    loss (their second training stage) and the gradients of (aux loss / world) of their parameters."""
    model = apply_expert_parallel(make_model(config), dist.group.WORLD)
    ids, mod = (rank_rows(t) for t in _batch(config, skewed=True))
    aux = model(ids, mod, labels=ids, train_aux_routers=True).aux_loss
    (aux / dist.get_world_size()).backward()
    return aux.detach(), {name: p.grad for name, p in model.named_parameters() if ".aux_router." in name}


def _train(config: dict, strategy: str):
    """Rank side: TRAIN_STEPS steps with wrap_model(..., strategy) on an (ep = 2) mesh -> (mean losses,
    this rank's parameters: its expert shards, the others whole)."""
    model = wrap_model(make_model(config), strategy, init_mesh(ep_size=dist.get_world_size()))
    opt = optimizer(model)
    losses = [distributed_step(model, opt, ids, mod) for ids, mod in global_batches(config, TRAIN_STEPS)]
    params = {name: p.detach() for name, p in unwrap_model(model).named_parameters()}
    return losses, {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in params.items()}


def _on_ranks():
    """Rank side: every forward/backward case, the training run, and the error for indivisible groups."""
    out = {(name, causal): _forward_backward(config, causal)
           for name, config in CONFIGS.items() for causal in (False, True)}
    out["skewed"] = _forward_backward(CONFIGS[SKEWED], causal=False, skewed=True)
    out["aux routers"] = _aux_router_losses(CONFIGS[SKEWED])
    for strategy in TRAIN_STRATEGIES:
        out[f"train {strategy}"] = _train(CONFIGS["expert-choice"], strategy)
    try:
        apply_expert_parallel(make_model(moma_config(experts_per_modality=[4, 1])), dist.group.WORLD)
    except ValueError as error:
        out["indivisible"] = str(error)
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_on_ranks, WORLD, threads=1)


def _is_expert(name: str) -> bool:
    return ".ffn.experts." in name


def _check_against_single_process(name: str, causal: bool, results, skewed: bool = False) -> None:
    config = CONFIGS[name]
    model = make_model(config)
    ids, mod = _batch(config, skewed)
    out = model(ids, mod, labels=ids, causal_routing=causal)
    out.loss.backward()
    assert_close("logits", out.logits, torch.cat([logits for logits, _, _ in results]), **TOL)
    assert_close("loss", out.loss, torch.stack([loss for _, loss, _ in results]).mean(), **TOL)
    for param_name, p in model.named_parameters():
        if p.grad is None:
            assert all(param_name not in grads for _, _, grads in results), param_name
        elif _is_expert(param_name):  # each rank's shard: the gradient of its rows of the bank
            for rank, (_, _, grads) in enumerate(results):
                rows = expert_rows(config["experts_per_modality"], rank)
                assert_close(f"rank {rank} grad {param_name}", p.grad[rows], grads[param_name], **TOL)
        else:  # replicated: the ranks' gradients sum to the whole batch's
            assert_close(f"grad {param_name}", p.grad, sum(grads[param_name] for _, _, grads in results), **TOL)


@pytest.mark.parametrize("causal", [False, True], ids=["batch-routing", "causal-routing"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_match_single_process(ranks, name, causal):
    _check_against_single_process(name, causal, [r[(name, causal)] for r in ranks])


def test_ranks_without_tokens_of_a_modality(ranks):
    _check_against_single_process(SKEWED, False, [r["skewed"] for r in ranks], skewed=True)


def test_auxiliary_router_loss_is_the_group_batch_mean(ranks):
    """The auxiliary routers learn the decisions taken over both ranks' tokens, with the loss (mean over
    the ranks) and gradients (sum of the ranks' (loss / world) gradients) of one process on the whole
    batch, though rank 1 holds only text and rank 0 all the image tokens."""
    config = CONFIGS[SKEWED]
    model = make_model(config)
    ids, mod = _batch(config, skewed=True)
    aux = model(ids, mod, labels=ids, train_aux_routers=True).aux_loss
    aux.backward()
    results = [r["aux routers"] for r in ranks]
    assert_close("aux loss", aux, torch.stack([loss for loss, _ in results]).mean(), **TOL)
    grads = {name: p.grad for name, p in model.named_parameters() if ".aux_router." in name and p.grad is not None}
    assert grads and all(set(grads) <= set(g) for _, g in results)
    for name, grad in grads.items():
        assert_close(f"grad {name}", grad, sum(g[name] for _, g in results if g[name] is not None), **TOL)


@pytest.mark.parametrize("strategy", TRAIN_STRATEGIES)
def test_training_with_wrap_model_matches_single_process(ranks, strategy):
    """"ep": the other parameters replicated (DDP); "fsdp" on the ep mesh: sharded by FSDP2 over the ranks."""
    config = CONFIGS["expert-choice"]
    model = make_model(config)
    opt = optimizer(model)
    ref_losses = [step(model, opt, ids, mod).item() for ids, mod in global_batches(config, TRAIN_STEPS)]
    for rank, r in enumerate(ranks):
        losses, params = r[f"train {strategy}"]
        assert_close(f"rank {rank} losses", torch.tensor(ref_losses), torch.tensor(losses), **TOL)
        for name, p in model.named_parameters():
            ref = p[expert_rows(config["experts_per_modality"], rank)] if _is_expert(name) else p
            assert_close(f"rank {rank} {name}", ref, params[name], **TOL)


def test_indivisible_groups_are_refused(ranks):
    assert "needs every modality group's number of experts to be divisible by 2" in ranks[0]["indivisible"]
    assert "[4, 1]" in ranks[0]["indivisible"]


@pytest.mark.parametrize("groups, ep_size, rank, blocks", [
    ([4, 2], 2, 0, [(0, 2), (4, 1)]),
    ([4, 2], 2, 1, [(2, 2), (5, 1)]),
    ([4, 4, 8], 4, 3, [(3, 1), (7, 1), (14, 2)]),
    ([3], 1, 0, [(0, 3)]),
], ids=["4t2i-rank0", "4t2i-rank1", "4t4i8s-ep4-rank3", "one-rank"])
def test_local_expert_blocks(groups, ep_size, rank, blocks):
    assert local_expert_blocks(groups, ep_size, rank) == blocks


def test_slots_follow_owner_then_local_order():
    # 4t2i over 2 ranks: rank 0 holds [t0 t1 i0], rank 1 [t2 t3 i1]
    assert _slot_of_expert([4, 2], 2).tolist() == [0, 1, 3, 4, 2, 5]


@pytest.mark.parametrize("groups, ep_size, rank, message", [
    ([4, 3], 2, 0, "divisible by 2"),
    ([4, 4], 2, 2, "ep_rank must be in"),
    ([4, 4], 0, 0, "ep_rank must be in"),
], ids=["indivisible", "rank-too-large", "no-ranks"])
def test_local_expert_blocks_errors(groups, ep_size, rank, message):
    with pytest.raises(ValueError, match=message):
        local_expert_blocks(groups, ep_size, rank)


def test_apply_needs_modality_experts():
    from tests.distributed.helpers import transformer_config

    with pytest.raises(ValueError, match="no ModalityExperts layer"):
        apply_expert_parallel(make_model(transformer_config()), None)


# ---------------------------------------------------------------- expert and data parallelism together
MESH_WORLD, MESH_EP = 4, 2  # a (dp 2, ep 2) mesh: ranks 0-1 and 2-3 are the expert-parallel groups


def _train_on_mesh(path: str):
    """Rank side (4 ranks): TRAIN_STEPS steps of wrap_model(..., strategy) on a (dp 2, ep 2) mesh for each
    strategy, then (under "ep") a distributed checkpoint -> {strategy: (mean losses, this rank's
    parameters, its EP group's rank)}."""
    config = CONFIGS["expert-choice"]
    out = {}
    for strategy in TRAIN_STRATEGIES:
        mesh = init_mesh(ep_size=MESH_EP)
        model = wrap_model(make_model(config), strategy, mesh)
        opt = optimizer(model)
        losses = [distributed_step(model, opt, ids, mod) for ids, mod in global_batches(config, TRAIN_STEPS)]
        if strategy == "ep":
            save_distributed(path, model, opt, state={"step": TRAIN_STEPS})
        params = {name: p.detach() for name, p in unwrap_model(model).named_parameters()}
        params = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in params.items()}
        out[strategy] = losses, params, mesh["ep"].get_local_rank()
    return out


# every expert takes every token: the loss of a micro-batch does not depend on which rows share it
ACCUMULATION_CONFIG = moma_config(experts_per_modality=[2, 2], capacity_factor=2.0)


def _accumulate_on_mesh():
    """Rank side (4 ranks, (dp 2, ep 2), "ep"): one update over 2 micro-batches of 1 row, the first
    under gradient_sync(enabled=False) -> (an expert shard's gradient after each backward, the
    parameters after the update, the EP rank)."""
    mesh = init_mesh(ep_size=MESH_EP)
    model = wrap_model(make_model(ACCUMULATION_CONFIG), "ep", mesh)
    opt = optimizer(model)
    ids, mod = (rank_rows(t) for t in global_batches(ACCUMULATION_CONFIG, 1, B=2 * MESH_WORLD)[0])
    w13 = next(bank.w13 for _, bank in expert_parallel_modules(unwrap_model(model)))
    grads = []
    for k in range(2):
        with gradient_sync(model, enabled=k == 1):
            (model(ids[k:k + 1], mod[k:k + 1], labels=ids[k:k + 1]).loss / 2).backward()
        grads.append(w13.grad.clone())
    opt.step()
    return grads, {name: p.detach() for name, p in unwrap_model(model).named_parameters()}, mesh["ep"].get_local_rank()


def _on_mesh(path: str):
    return {**_train_on_mesh(path), "accumulation": _accumulate_on_mesh()}


@pytest.fixture(scope="module")
def mesh_ranks(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mesh") / "step-3")
    return path, spawn(_on_mesh, MESH_WORLD, args=(path,), threads=1)


def test_gradient_accumulation_syncs_expert_shards_once(mesh_ranks):
    """The replicas of a shard (ranks 0 and 2, 1 and 3) keep their own gradients after the unsynchronised
    micro-batch and hold the same mean after the last one; the update is one process's on all 8 rows."""
    ranks = [r["accumulation"] for r in mesh_ranks[1]]
    for a, b in ((0, 2), (1, 3)):
        assert not torch.allclose(ranks[a][0][0], ranks[b][0][0])
        assert_close(f"ranks {a} and {b} after the update's backwards", ranks[a][0][1], ranks[b][0][1], **TOL)
    model = make_model(ACCUMULATION_CONFIG)
    step(model, optimizer(model), *global_batches(ACCUMULATION_CONFIG, 1, B=2 * MESH_WORLD)[0])
    for rank, (_, params, ep_rank) in enumerate(ranks):
        for name, p in model.named_parameters():
            ref = p[expert_rows(ACCUMULATION_CONFIG["experts_per_modality"], ep_rank)] if _is_expert(name) else p
            assert_close(f"rank {rank} {name}", ref, params[name], **TOL)


def _two_replicas():
    """The reference of a (dp 2, ep 2) job: one process, every batch as 2 halves (one per EP group, expert
    choice over each half), the step on the mean of their losses."""
    config = CONFIGS["expert-choice"]
    model = make_model(config)
    opt = optimizer(model)
    losses = [step(model, opt, ids, mod, shards=MESH_WORLD // MESH_EP).item()
              for ids, mod in global_batches(config, TRAIN_STEPS)]
    return model, losses


@pytest.mark.parametrize("strategy", TRAIN_STRATEGIES)
def test_expert_and_data_parallel_mesh_matches_single_process(mesh_ranks, strategy):
    """"fsdp": the experts as under "ep", the other parameters sharded over all 4 ranks."""
    ranks = [r[strategy] for r in mesh_ranks[1]]
    model, ref_losses = _two_replicas()
    experts_per_modality = CONFIGS["expert-choice"]["experts_per_modality"]
    assert [ep_rank for _, _, ep_rank in ranks] == [0, 1, 0, 1]
    for rank, (losses, params, ep_rank) in enumerate(ranks):
        assert_close(f"rank {rank} losses", torch.tensor(ref_losses), torch.tensor(losses), **TOL)
        for name, p in model.named_parameters():
            ref = p[expert_rows(experts_per_modality, ep_rank)] if _is_expert(name) else p
            assert_close(f"rank {rank} {name}", ref, params[name], **TOL)


def test_expert_and_data_parallel_checkpoint_consolidates(mesh_ranks, tmp_path):
    """Both replicas of a shard hold the same rows: the checkpoint has every expert once, at its global row."""
    path, _ = mesh_ranks
    model, _ = _two_replicas()
    merged = momoe.from_pretrained(consolidate(path, str(tmp_path / "model"))).state_dict()
    assert merged.keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():
        assert_close(name, p, merged[name], **TOL)
