"""Training checkpoints: exact resumption, no pickle, atomic writes, clear errors on bad checkpoints."""
import os
import pickle

import pytest
import torch

import momoe
from momoe.checkpoint import CheckpointError, save_json
from momoe.train import TrainConfig, Trainer, resolve_checkpoint
from momoe.train import checkpointing
from momoe.train.optim import build_optimizer, load_optimizer_state, optimizer_state
from tests.train.helpers import tiny_config

TIMING = ("tokens_per_s", "elapsed_s")


class Killed(Exception):
    pass


def build(data, family, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(family, data.vocab)
    if family == "moma":
        config = config.replace(router_gumbel_noise=True)  # the routers draw random numbers: RNG state matters
    return momoe.build_model(config)


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


SETTINGS = TrainConfig(steps=6, batch_size=2, seq_len=40, grad_accum=2, checkpoint_interval=3, warmup=2, lr=1e-2)


@pytest.mark.parametrize("family", ["moma", "mom-mamba"])
def test_resume_after_a_kill_is_bitwise_exact(train_data, tmp_path, family):
    straight = build(train_data, family)
    expected = Trainer(straight, train_data, SETTINGS, out_dir=str(tmp_path / "straight"), progress=False).fit()

    def kill_during_update_5(trainer, record):
        if trainer.step == 4:
            raise Killed  # after update 4 was logged, before update 5: the checkpoint is at 3

    with pytest.raises(Killed):
        Trainer(build(train_data, family), train_data, SETTINGS, out_dir=str(tmp_path / "killed"),
                progress=False).fit(on_step=kill_during_update_5)
    torch.manual_seed(1234)  # a fresh process: other weights, other random state
    model = build(train_data, family, seed=99)
    trainer = Trainer(model, train_data, SETTINGS, out_dir=str(tmp_path / "killed"), progress=False)
    assert trainer.resume().endswith("step-000003")
    assert trainer.step == 3 and [r["step"] for r in trainer.records] == [1, 2, 3]  # update 4 dropped from the log
    resumed = trainer.fit()
    assert without_timing(resumed) == without_timing(expected)
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_hold_no_pickle(train_data, tmp_path, monkeypatch):
    model = build(train_data, "transformer")
    Trainer(model, train_data, TrainConfig(steps=2, batch_size=2, seq_len=32), out_dir=str(tmp_path),
            progress=False).fit()
    folder = resolve_checkpoint(str(tmp_path))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "training_state.json",
                                          "training_state.safetensors"]

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    config = TrainConfig(steps=3, batch_size=2, seq_len=32)
    trainer = Trainer(build(train_data, "transformer", seed=5), train_data, config, out_dir=str(tmp_path),
                      progress=False)
    trainer.resume()
    loaded = momoe.from_pretrained(folder)  # the model part is an ordinary momoe checkpoint
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    trainer.fit()


def test_a_failed_write_leaves_the_previous_checkpoint(train_data, tmp_path, monkeypatch):
    config = TrainConfig(steps=4, batch_size=2, seq_len=32, checkpoint_interval=2)
    trainer = Trainer(build(train_data, "transformer"), train_data, config, out_dir=str(tmp_path), progress=False)
    original = checkpointing.save_weights

    def fail_at_step_4(tensors, path, metadata=None):
        if trainer.step == 4 and path.endswith(checkpointing.STATE_TENSORS):
            original(tensors, path, metadata)
            raise OSError("disk full")
        original(tensors, path, metadata)

    monkeypatch.setattr(checkpointing, "save_weights", fail_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["step-000002"]  # no step 4, no temporary folder left
    assert checkpointing.latest_checkpoint(str(tmp_path)).endswith("step-000002")
    monkeypatch.setattr(checkpointing, "save_weights", original)
    os.makedirs(folder / ".tmp-step-000004-crashed")  # what a kill mid-write leaves: cleaned by the next write
    again = Trainer(build(train_data, "transformer"), train_data, config, out_dir=str(tmp_path), progress=False)
    again.resume()
    again.fit()
    assert sorted(os.listdir(folder)) == ["step-000002", "step-000004"]


def test_only_the_latest_checkpoints_are_kept(train_data, tmp_path):
    config = TrainConfig(steps=4, batch_size=2, seq_len=32, checkpoint_interval=1, keep_checkpoints=2)
    Trainer(build(train_data, "transformer"), train_data, config, out_dir=str(tmp_path), progress=False).fit()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000003", "step-000004"]


@pytest.fixture
def run(train_data, tmp_path):
    """A run folder with one checkpoint (step 2) of a tiny transformer."""
    config = TrainConfig(steps=2, batch_size=2, seq_len=32)
    Trainer(build(train_data, "transformer"), train_data, config, out_dir=str(tmp_path / "run"), progress=False).fit()
    return str(tmp_path / "run"), config


def resume(run_dir, data, config, model=None):
    model = model or build(data, "transformer")
    return Trainer(model, data, config, out_dir=run_dir, progress=False).resume()


def test_mismatched_model_or_settings(run, train_data, validation_data):
    run_dir, config = run
    with pytest.raises(CheckpointError, match=r"another model: its config differs in \['d_model'\]"):
        resume(run_dir, train_data, config, momoe.build_model(tiny_config("transformer", train_data.vocab, d_model=48)))
    with pytest.raises(CheckpointError, match="other settings.*batch_size=2, 4"):
        resume(run_dir, train_data, config.replace(batch_size=4))
    with pytest.raises(CheckpointError, match="loader state was saved with other settings"):
        resume(run_dir, validation_data, config)  # other data
    resume(run_dir, train_data, config.replace(steps=5, log_interval=3))  # allowed: train longer, log differently


def test_corrupt_checkpoints(run, train_data, tmp_path):
    run_dir, config = run
    folder = resolve_checkpoint(run_dir)
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        resume(run_dir, train_data, config)
    with open(os.path.join(folder, checkpointing.STATE_JSON), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resume(run_dir, train_data, config)
    save_json({"format": "something-else", "version": 1}, os.path.join(folder, checkpointing.STATE_JSON))
    with pytest.raises(CheckpointError, match="expected 'momoe-training-state'"):
        resume(run_dir, train_data, config)
    save_json({"checkpoint": "checkpoints/step-000099", "step": 99}, os.path.join(run_dir, "latest.json"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resume(run_dir, train_data, config)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resume(str(tmp_path / "empty"), train_data, config)
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_optimizer_state_round_trip_and_mismatch(train_data):
    config = TrainConfig(steps=2, batch_size=2, seq_len=32)
    model = build(train_data, "transformer")
    trainer = Trainer(model, train_data, config, progress=False)
    trainer.train_step()
    tensors, meta = optimizer_state(trainer.optimizer)
    assert all(torch.is_tensor(t) for t in tensors.values())
    fresh = build_optimizer(model, config)
    load_optimizer_state(fresh, tensors, meta, "test")
    for a, b in zip(trainer.optimizer.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_optimizer(build(train_data, "mamba"), config)
    with pytest.raises(CheckpointError, match="optimizer"):
        load_optimizer_state(other, tensors, meta, "test")
