"""Distributed checkpoints: saved on 2 ranks (expert-parallel, FSDP2, FSDP2 + expert-parallel), resumed on 2
ranks under another layout and on 1 process with the same next-step losses; consolidated to a plain
checkpoint."""
import os

import pytest
import torch
import torch.distributed as dist

import momoe
from momoe.checkpoint import CheckpointError
from momoe.distributed import consolidate, init_mesh, load_distributed, save_distributed, spawn, wrap_model
from tests.distributed.helpers import (TOL, WORLD, distributed_step, global_batches, make_model, moma_config, optimizer,
                                       rank_rows, step)
from tests.utils import assert_close

# Capacity factor E_m: every expert takes every token of its group, so the routing (and the loss) does
# not depend on how the batch is split and every strategy trains the same model as one process.
CONFIG = moma_config(experts_per_modality=[2, 2], capacity_factor=2.0)
BATCHES = global_batches(CONFIG, 3)  # step 1 before the checkpoint, steps 2 and 3 after it
# layout -> (strategy, ep size): "fsdp+ep" shards the experts over the ranks and the rest with FSDP2
LAYOUTS = {"ep": ("ep", WORLD), "fsdp": ("fsdp", 1), "fsdp+ep": ("fsdp", WORLD)}


def _resume(path: str, layout: str):
    """Rank side: a differently initialised model and optimizer, loaded from path -> (state, next losses)."""
    strategy, ep_size = LAYOUTS[layout]
    model = wrap_model(make_model(CONFIG, seed=1), strategy, init_mesh(ep_size=ep_size))
    opt = optimizer(model)
    state = load_distributed(path, model, opt)
    return model, opt, state


def _next_losses(model, opt):
    return [distributed_step(model, opt, ids, mod) for ids, mod in BATCHES[1:]]


def _on_ranks(ep_path: str, fsdp_path: str, fsdp_ep_path: str):
    model = wrap_model(make_model(CONFIG), "ep", init_mesh(ep_size=WORLD))
    opt = optimizer(model)
    distributed_step(model, opt, *BATCHES[0])
    save_distributed(ep_path, model, opt, state={"step": 1})
    with torch.no_grad():
        logits = model(rank_rows(BATCHES[0][0]), rank_rows(BATCHES[0][1])).logits
    out = {"logits": logits, "losses": _next_losses(model, opt)}
    resaved = {"fsdp": fsdp_path, "fsdp+ep": fsdp_ep_path}
    for layout in LAYOUTS:
        model, opt, state = _resume(ep_path, layout)
        if layout in resaved:
            save_distributed(resaved[layout], model, opt, state=state)
        out[f"ep -> {layout}"] = (state, _next_losses(model, opt))
    for layout, path in resaved.items():
        other = "ep" if layout == "fsdp" else "fsdp"
        model, opt, state = _resume(path, other)
        out[f"{layout} -> {other}"] = (state, _next_losses(model, opt))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint saved under EP, re-saved under FSDP2 and under FSDP2 + EP after loading it, what the
    ranks returned)."""
    root = tmp_path_factory.mktemp("dcp")
    paths = str(root / "ep"), str(root / "fsdp"), str(root / "fsdp-ep")
    return (*paths, spawn(_on_ranks, WORLD, args=paths, threads=1))


def test_resume_on_two_ranks(saved):
    *_, ranks = saved
    for rank, r in enumerate(ranks):
        for case in ("ep -> ep", "ep -> fsdp", "ep -> fsdp+ep", "fsdp -> ep", "fsdp+ep -> fsdp"):
            state, losses = r[case]
            assert state == {"step": 1}
            assert_close(f"rank {rank} {case} next losses", torch.tensor(r["losses"]), torch.tensor(losses), **TOL)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["saved-under-ep", "saved-under-fsdp", "saved-under-fsdp+ep"])
def test_resume_on_one_process(saved, which):
    path, ranks = saved[which], saved[-1]
    model = make_model(CONFIG, seed=1)
    opt = optimizer(model)
    assert load_distributed(path, model, opt) == {"step": 1}
    never_stepped = [p for name, p in model.named_parameters() if ".aux_router." in name]  # no gradient so far
    assert never_stepped and not any(p in opt.state for p in never_stepped)
    losses = [step(model, opt, ids, mod).item() for ids, mod in BATCHES[1:]]
    assert_close("next losses", torch.tensor(ranks[0]["losses"]), torch.tensor(losses), **TOL)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["saved-under-ep", "saved-under-fsdp", "saved-under-fsdp+ep"])
def test_consolidate_loads_with_from_pretrained(saved, tmp_path, which):
    path, ranks = saved[which], saved[-1]
    out = consolidate(path, str(tmp_path / "plain"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    model = momoe.from_pretrained(out)
    with torch.no_grad():
        logits = model(*BATCHES[0]).logits
    assert_close("logits", torch.cat([r["logits"] for r in ranks]), logits, **TOL)


def test_save_and_load_without_process_group(tmp_path):
    model = make_model(CONFIG)
    save_distributed(str(tmp_path / "one"), model, state={"note": "one process"})
    save_distributed(str(tmp_path / "one"), model, state={"note": "replaced"})  # overwrites in place
    fresh = make_model(CONFIG, seed=1)
    assert load_distributed(str(tmp_path / "one"), fresh) == {"note": "replaced"}
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert not dist.is_initialized()
    assert sorted(os.listdir(tmp_path)) == ["one"]


def test_load_errors(saved, tmp_path):
    ep_path = saved[0]
    with pytest.raises(CheckpointError, match="is not a distributed checkpoint"):
        load_distributed(str(tmp_path / "nothing"), make_model(CONFIG))
    shapes = r"ffn.experts.w13: saved \(4, 96, 32\), expected \(4, 128, 32\)"
    with pytest.raises(CheckpointError, match=f"does not match.*{shapes}"):
        load_distributed(ep_path, make_model({**CONFIG, "d_ff": 64}))
    save_distributed(str(tmp_path / "model-only"), make_model(CONFIG))
    model = make_model(CONFIG)
    with pytest.raises(CheckpointError, match="was saved without optimizer state"):
        load_distributed(str(tmp_path / "model-only"), model, optimizer(model))
    with pytest.raises(ValueError, match="state must be JSON-serialisable"):
        save_distributed(str(tmp_path / "bad-state"), model, state={"rng": torch.zeros(2)})
    assert not os.path.exists(tmp_path / "bad-state") and not os.path.exists(tmp_path / "bad-state.tmp")
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        consolidate(str(tmp_path / "nothing"), str(tmp_path / "out"))
