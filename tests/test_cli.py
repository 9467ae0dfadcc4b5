"""The `momoe` command line end to end on tiny settings: train -> resume -> eval -> generate -> info ->
merge -> compare, and bad inputs with clear errors."""
import json
import os

import pytest
import torch

import momoe
from momoe import cli
from momoe.train import resolve_checkpoint
from momoe.train.log import read_log
from tests.train.helpers import make_dataset_root, single_thread  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ["--d-model", "32", "--n-layer", "2", "--n-heads", "2", "--batch-size", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset_root(tmp_path_factory.mktemp("cli-data"))


def run_cli(*args):
    cli.main([str(a) for a in args])


def train(data_root, out, *extra):
    run_cli("train", "--family", "moma", *TINY, "--dataset", data_root, "--out", out, "--quiet", *extra)


def test_train_resume_eval_generate_info(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train(data_root, run, "--steps", 4, "--checkpoint-interval", 2, "--train-aux-routers", "--lr", "0.01")
    assert "4 updates" in capsys.readouterr().out
    run_cli("train", "--out", run, "--resume", "--steps", 6, "--quiet")  # settings and data come from the run
    out = capsys.readouterr().out
    assert "resuming" in out and "step-000004" in out and "6 updates" in out
    assert [r["step"] for r in read_log(str(run / "log.jsonl"))] == list(range(1, 7))

    run_cli("eval", run, "--batch-size", 2, "--seq-len", 64)
    out = capsys.readouterr().out
    for word in ("modality", "text", "image", "speech", "all", "perplexity"):
        assert word in out
    run_cli("eval", run, "--json", "--causal-routing")
    result = json.loads(capsys.readouterr().out)
    assert set(result["loss_per_modality"]) == {"text", "image", "speech"} and result["perplexity"] > 1

    run_cli("generate", run, "--prompt", "text:a one", "--then", "image", "--out", tmp_path / "gen",
            "--max-new-tokens", 20)
    out = capsys.readouterr().out
    assert out.startswith("a one>>> [image: ") and "wrote" in out
    assert any(f.endswith("-image.png") for f in os.listdir(tmp_path / "gen"))

    run_cli("info", run)
    assert "moma" in capsys.readouterr().out
    run_cli("info", "moma-90m-4t4i", "--seq-len", 4096)
    out = capsys.readouterr().out
    assert "moma-90m-4t4i (moma)" in out and "image" in out
    run_cli("info", "--family", "mom-mamba", "--dataset", data_root, "--d-model", 32, "--json")
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "mamba" and set(info["flops_per_token"]) == {"text", "image", "speech"}


def test_train_from_a_config_file_and_init(data_root, tmp_path, capsys):
    config = momoe.train.family_config("mom-mamba", momoe.data.load_dataset(data_root).vocab, d_model=32, n_layer=1)
    (tmp_path / "model.json").write_text(json.dumps(config.to_dict()))
    run_cli("train", "--model", tmp_path / "model.json", "--dataset", data_root, "--out", tmp_path / "a",
            "--steps", 1, "--batch-size", 2, "--seq-len", 32, "--quiet", "--bf16")
    run_cli("train", "--init", tmp_path / "a", "--dataset", data_root, "--out", tmp_path / "b", "--steps", 1,
            "--batch-size", 2, "--seq-len", 32, "--quiet", "--lr", "1e-9")
    a = momoe.from_pretrained(resolve_checkpoint(str(tmp_path / "a")))
    b = momoe.from_pretrained(resolve_checkpoint(str(tmp_path / "b")))
    assert a.config == b.config == config
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)  # b started from a (lr ~ 0)


def test_merge_and_mixture_search(data_root, tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 1)):
        train(data_root, tmp_path / name, "--steps", 1, "--seed", seed)
    capsys.readouterr()
    run_cli("merge", tmp_path / "a", tmp_path / "b", "--weights", 0.25, 0.75, "--out", tmp_path / "merged")
    assert "0.25 *" in capsys.readouterr().out
    a, b, merged = (momoe.from_pretrained(resolve_checkpoint(str(tmp_path / n))) for n in ("a", "b", "merged"))
    for (name, pm), pa, pb in zip(merged.named_parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(pm, 0.25 * pa + 0.75 * pb, msg=name)

    run_cli("merge", tmp_path / "a", tmp_path / "b", "--search", "--resolution", 2, "--dataset", data_root,
            "--max-batches", 1, *TINY[-4:], "--out", tmp_path / "best")
    out = capsys.readouterr().out
    assert "predicted best mixture: a " in out and "0.50 0.50" in out
    assert os.path.isfile(tmp_path / "best" / "model.safetensors")


def test_compare(data_root, tmp_path, capsys):
    run_cli("compare", "--models", "transformer", "mom-mamba", *TINY, "--dataset", data_root, "--dense-steps", 2,
            "--evaluations", 1, "--eval-batches", 1, "--out", tmp_path, "--quiet")
    out = capsys.readouterr().out
    assert "mom-mamba" in out and "vs transformer" in out and "training FLOPs" in out
    runs = json.loads((tmp_path / "compare.json").read_text())
    assert [r["name"] for r in runs] == ["transformer", "mom-mamba"] and runs[0]["steps"] == 2


def test_ops(capsys):
    run_cli("ops")
    out = capsys.readouterr().out
    assert "torch.ops.momoe.grouped_gemm" in out and "torch.ops.momoe.selective_scan_fwd" in out


def test_bad_inputs(data_root, tmp_path):
    def fails(match, *args):
        with pytest.raises(SystemExit, match=match):
            run_cli(*args)

    out = ["--out", tmp_path / "x", "--dataset", data_root, "--quiet", "--steps", 1]
    fails("give --model", "train", *out)
    fails("unknown model family", "train", "--family", "gpt", *out)
    fails("not a zoo card", "train", "--model", "no-such-model", *out)
    fails("data's modalities", "train", "--model", "mamba-37m-chameleon", "--fit-vocab", *out)
    fails("has no 'train' split", "train", "--family", "mamba", "--out", tmp_path / "y", "--dataset", tmp_path)
    fails("no checkpoint to resume", "train", "--resume", *out)
    fails("neither a checkpoint", "eval", tmp_path)
    fails("does not exist", "generate", tmp_path / "missing")
    train(data_root, tmp_path / "run", "--steps", 1)
    fails("<modality>:<value>", "generate", tmp_path / "run", "--prompt", "hello")
    fails("unknown modality 'video'", "generate", tmp_path / "run", "--then", "video")
    fails("at least two", "merge", tmp_path / "run")
    fails("needs --out", "merge", tmp_path / "run", tmp_path / "run")
    run_cli("train", "--family", "mamba", *TINY, "--dataset", data_root, "--out", tmp_path / "m", "--steps", 1,
            "--quiet")
    fails("different architectures", "merge", tmp_path / "run", tmp_path / "m", "--out", tmp_path / "z")
    fails("other settings", "train", "--out", tmp_path / "run", "--resume", "--batch-size", 4)
