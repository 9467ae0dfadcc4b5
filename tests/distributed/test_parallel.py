"""DDP and FSDP2 over 2 ranks against single-process training on the same global batch."""
import pytest
import torch
import torch.distributed as dist

from momoe.distributed import init_distributed, init_mesh, is_main_process, spawn, unwrap_model, wrap_model
from tests.distributed.helpers import (TOL, WORLD, distributed_step, full_state, global_batches, make_model,
                                       moma_config, optimizer, step, transformer_config)
from tests.utils import assert_close

STEPS = 3
CONFIGS = {"transformer": transformer_config(), "moma": moma_config()}
STRATEGIES = ("ddp", "fsdp")


def _train_on_ranks():
    """Rank side: STEPS steps of each model under each strategy -> {(model, strategy): (losses, full state)}."""
    out = {}
    for name, config in CONFIGS.items():
        for strategy in STRATEGIES:
            model = wrap_model(make_model(config), strategy)
            opt = optimizer(model)
            losses = [distributed_step(model, opt, ids, mod) for ids, mod in global_batches(config, STEPS)]
            out[(name, strategy)] = (losses, full_state(model))
    try:
        wrap_model(make_model(CONFIGS["moma"]), "ddp", init_mesh(ep_size=WORLD))
    except ValueError as error:
        out["ddp on an ep mesh"] = str(error)
    out["main"] = is_main_process()
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_train_on_ranks, WORLD, threads=1)


def _reference(name: str):
    """Single process on the whole global batch. MoMa's expert choice picks tokens over the batch it is
    given, and under DDP / FSDP that is each rank's rows: its reference is the mean of the losses of
    the per-rank halves (what gradient accumulation over them gives); the dense model's loss does not
    depend on the split."""
    config = CONFIGS[name]
    model = make_model(config)
    opt = optimizer(model)
    shards = WORLD if name == "moma" else 1
    losses = [step(model, opt, ids, mod, shards=shards).item() for ids, mod in global_batches(config, STEPS)]
    return losses, model.state_dict()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_single_process(ranks, name, strategy):
    ref_losses, ref_state = _reference(name)
    for rank, result in enumerate(ranks):
        losses, state = result[(name, strategy)]
        assert_close(f"rank {rank} losses", torch.tensor(ref_losses), torch.tensor(losses), **TOL)
        assert state.keys() == ref_state.keys()
        for key, ref in ref_state.items():
            assert_close(f"rank {rank} {key}", ref, state[key], **TOL)


def test_main_process_and_mesh_errors(ranks):
    assert [r["main"] for r in ranks] == [True, False]
    assert "needs strategy 'ep'" in ranks[0]["ddp on an ep mesh"]


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and is_main_process() and not dist.is_initialized()
    model = make_model(transformer_config())
    assert unwrap_model(model) is model


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK must be in [0, WORLD_SIZE)"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MOMOE_DIST_TIMEOUT": "soon"}, "MOMOE_DIST_TIMEOUT must be a number"),
], ids=["world-not-int", "rank-out-of-range", "rank-missing", "bad-timeout"])
def test_init_distributed_bad_environment(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOMOE_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        init_distributed()


def test_bad_strategy_and_no_process_group():
    model = make_model(transformer_config())
    with pytest.raises(ValueError, match="unknown parallel strategy 'tp'"):
        wrap_model(model, "tp")
    with pytest.raises(ValueError, match="needs a process group"):
        init_mesh(2)
    with pytest.raises(ValueError, match="timeout must be positive"):
        init_distributed(timeout_s=0)
