"""`momoe demo` on tiny settings: every stage runs, and its checkpoints load in `momoe generate`."""
import os

import pytest

from momoe import cli, demo
from momoe.train import TrainConfig
from momoe.train.plot import have_matplotlib
from tests.train.helpers import single_thread  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_demo_trains_compares_plots_and_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SIZES", dict(d_model=32, n_layer=1, n_heads=2, experts=2))
    monkeypatch.setattr(demo, "TRAIN", TrainConfig(steps=2, batch_size=2, seq_len=64, warmup=1))
    out = tmp_path / "demo"
    cli.main(["demo", "--out", str(out)])
    text = capsys.readouterr().out
    for stage in range(1, demo.STAGES + 1):
        assert f"[{stage}/{demo.STAGES}]" in text
    for name in demo.MODELS:
        assert name in text
        assert os.path.isfile(out / name / "latest.json") and os.path.isfile(out / name / "log.jsonl")
    assert "image loss" in text and "tokens/s" in text
    assert os.path.isfile(out / "loss.png") == have_matplotlib()
    assert any(f.endswith("-image.png") for f in os.listdir(out / "generated"))

    cli.main(["generate", str(out / "moma"), "--prompt", "text:the digit 3", "--then", "image",
              "--out", str(tmp_path / "more"), "--max-new-tokens", "17"])
    assert "the digit 3>>> [image: " in capsys.readouterr().out
