"""The training loop: accumulation equals the big batch, log records, aux routers, bf16, bad inputs."""
import json
import os

import pytest
import torch

import momoe
from momoe.train import TrainConfig, Trainer
from momoe.train.plot import have_matplotlib
from tests.train.helpers import tiny_config
from tests.utils import assert_close

RECORD_KEYS = {"step", "loss", "loss_per_modality", "aux_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen",
               "elapsed_s"}


def first_update_gradients(model, data, **settings):
    """The gradients of the first update (captured just before the optimizer step) and its record."""
    trainer = Trainer(model, data, TrainConfig(steps=3, clip=0.0, **settings), progress=False)
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(capture)
    return grads, trainer.train_step()


@pytest.mark.parametrize("family", ["transformer", "mom-mamba"])
def test_grad_accumulation_equals_the_big_batch(train_data, family):
    torch.manual_seed(0)
    model = momoe.build_model(tiny_config(family, train_data.vocab))
    twin = momoe.build_model(model.config)
    twin.load_state_dict(model.state_dict())
    big, big_record = first_update_gradients(model, train_data, batch_size=4, seq_len=48)
    acc, acc_record = first_update_gradients(twin, train_data, batch_size=2, grad_accum=2, seq_len=48)
    assert set(big) == set(acc)
    for name in big:
        assert_close(name, big[name], acc[name], atol=1e-6, rtol=1e-4)
    assert acc_record["loss"] == pytest.approx(big_record["loss"], rel=1e-6)
    for modality, loss in big_record["loss_per_modality"].items():
        assert acc_record["loss_per_modality"][modality] == pytest.approx(loss, rel=1e-6)
    assert acc_record["tokens_seen"] == big_record["tokens_seen"] == 4 * 48


def test_log_records_plot_and_progress(train_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = momoe.build_model(tiny_config("transformer", train_data.vocab))
    config = TrainConfig(steps=4, batch_size=2, seq_len=32, log_interval=2, warmup=1)
    records = Trainer(model, train_data, config, out_dir=str(tmp_path), name="tiny").fit()
    assert [r["step"] for r in records] == [2, 4]
    with open(tmp_path / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert logged == records
    for r in records:
        assert set(r) == RECORD_KEYS
        assert set(r["loss_per_modality"]) == {"text", "image", "speech"}
        assert r["tokens_seen"] == r["step"] * 2 * 32 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert records[-1]["lr"] == pytest.approx(config.lr * config.min_lr_ratio)
    assert os.path.isfile(tmp_path / "loss.png") == have_matplotlib()
    err = capsys.readouterr().err
    assert "tiny" in err and "tok/s" in err and "image" in err  # the progress bar


def test_loss_goes_down(train_data):
    torch.manual_seed(0)
    model = momoe.build_model(tiny_config("moma", train_data.vocab))
    records = Trainer(model, train_data, TrainConfig(steps=12, batch_size=4, seq_len=48, lr=1e-2, warmup=2),
                      progress=False).fit()
    assert records[-1]["loss"] < records[0]["loss"] - 0.5


def test_aux_routers_learn_without_changing_the_model(train_data):
    def run(train_aux_routers):
        torch.manual_seed(0)
        model = momoe.build_model(tiny_config("moma", train_data.vocab))
        before = [p.clone() for p in model.aux_router_parameters()]
        config = TrainConfig(steps=2, batch_size=2, seq_len=32, clip=0.0, train_aux_routers=train_aux_routers)
        records = Trainer(model, train_data, config, progress=False).fit()
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.aux_router_parameters()))
        return records, moved

    plain, plain_moved = run(False)
    joint, joint_moved = run(True)
    assert joint_moved and not plain_moved
    assert [r["loss"] for r in joint] == [r["loss"] for r in plain]
    assert joint[0]["aux_loss"] > 0 and plain[0]["aux_loss"] == 0


@pytest.mark.parametrize("family", ["transformer", "moma", "mom-mamba"])
def test_bf16_autocast(train_data, family):
    torch.manual_seed(0)
    model = momoe.build_model(tiny_config(family, train_data.vocab))
    records = Trainer(model, train_data, TrainConfig(steps=2, batch_size=2, seq_len=32, bf16=True),
                      progress=False).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


def test_bad_inputs(train_data):
    config = tiny_config("transformer", train_data.vocab)
    with pytest.raises(ValueError, match="data's modalities"):
        Trainer(momoe.build_model(config.replace(modalities=["text", "image"])), train_data, TrainConfig())
    with pytest.raises(ValueError, match="needs vocab_size >="):
        Trainer(momoe.build_model(config.replace(vocab_size=100)), train_data, TrainConfig())
    mamba = momoe.build_model(tiny_config("mamba", train_data.vocab))
    with pytest.raises(ValueError, match="no auxiliary routers"):
        Trainer(mamba, train_data, TrainConfig(train_aux_routers=True))
    with pytest.raises(ValueError, match="too few for one batch"):
        Trainer(mamba, train_data, TrainConfig(batch_size=64, seq_len=4096))


def test_without_matplotlib_the_plot_is_skipped(train_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("momoe.train.plot.have_matplotlib", lambda: False)
    model = momoe.build_model(tiny_config("mamba", train_data.vocab))
    Trainer(model, train_data, TrainConfig(steps=1, batch_size=2, seq_len=32), out_dir=str(tmp_path)).fit()
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "loss.png") and os.path.isfile(tmp_path / "latest.json")
