"""`momoe train` under torchrun (2 processes, gloo on the CPU, launched by the tests as subprocesses):
DDP and FSDP2 losses equal one process on the same global batch, a 2-rank FSDP2 checkpoint resumes on
1 and on 2 processes with the same next losses, `momoe consolidate` gives a model equal to the one
process's, and a failing rank ends the job quickly with its error."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import momoe
from momoe import cli
from momoe.train.checkpointing import LATEST_FILE, checkpoint_name
from momoe.train.log import read_log
from tests.utils import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD = 2
ROWS = 4  # the global batch: ROWS // WORLD rows on each rank
STEPS = 3
TOL = dict(atol=1e-5, rtol=1e-5)


def model_args(data_root, out, *extra):
    return ["--family", "mot", "--d-model", "32", "--n-layer", "2", "--n-heads", "2", "--seq-len", "32",
            "--steps", str(STEPS), "--dataset", str(data_root), "--out", str(out), "--quiet", *map(str, extra)]


def torchrun(args, nproc: int = WORLD, module=("-m", "momoe", "train"), timeout: float = 120):
    """Run `torchrun --nproc-per-node nproc <module> args` on a free port; returns (return code, output)."""
    env = {**os.environ, "MOMOE_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", "localhost:0", *module, *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def losses(run) -> list:
    return [record["loss"] for record in read_log(os.path.join(run, "log.jsonl"))]


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory):
    """One process, the global batch of ROWS rows."""
    run = str(tmp_path_factory.mktemp("single") / "run")
    cli.main(["train", *model_args(data_root, run, "--batch-size", ROWS)])
    return run


@pytest.fixture(scope="module")
def fsdp(data_root, tmp_path_factory):
    """2 ranks, FSDP2, a checkpoint after every step."""
    run = str(tmp_path_factory.mktemp("fsdp") / "run")
    code, out = torchrun(model_args(data_root, run, "--batch-size", ROWS // WORLD, "--parallel", "fsdp",
                                    "--checkpoint-interval", 1, "--keep-checkpoints", STEPS))
    assert code == 0, out
    return run


def test_ddp_matches_single_process(data_root, single, tmp_path):
    run = str(tmp_path / "ddp")
    code, out = torchrun(model_args(data_root, run, "--batch-size", ROWS // WORLD))  # ddp: the default
    assert code == 0, out
    assert "training on 2 processes (ddp, cpu)" in out
    assert_close("ddp losses", torch.tensor(losses(single)), torch.tensor(losses(run)), **TOL)
    logged = read_log(os.path.join(run, "log.jsonl"))
    assert [r["tokens_seen"] for r in logged] == [ROWS * 32 * s for s in range(1, STEPS + 1)]  # global tokens
    # rank 0 wrote the usual single-process checkpoint of the unwrapped model
    model = momoe.from_pretrained(os.path.join(run, "checkpoints", checkpoint_name(STEPS)))
    assert not any(name.startswith("module.") for name in model.state_dict())


def test_fsdp_matches_single_process(single, fsdp):
    assert len(losses(fsdp)) == STEPS
    assert_close("fsdp losses", torch.tensor(losses(single)), torch.tensor(losses(fsdp)), **TOL)
    assert os.path.isfile(os.path.join(fsdp, "checkpoints", checkpoint_name(STEPS), ".metadata"))


def _rewound(fsdp, tmp_path, name: str) -> str:
    """A copy of the FSDP2 run as if it had been stopped after its first checkpoint."""
    run = str(tmp_path / name)
    shutil.copytree(fsdp, run)
    with open(os.path.join(run, LATEST_FILE), "w") as f:
        json.dump({"checkpoint": f"checkpoints/{checkpoint_name(1)}", "step": 1}, f)
    return run


@pytest.mark.parametrize("nproc", [1, 2], ids=["on-1-process", "on-2-ranks"])
def test_fsdp_checkpoint_resumes(fsdp, tmp_path, nproc, capsys):
    run = _rewound(fsdp, tmp_path, f"resume-{nproc}")
    if nproc == 1:  # one plain process: the global batch of ROWS rows on it, a single-process checkpoint
        cli.main(["train", "--out", run, "--resume", "--quiet"])
        assert f"resuming from {os.path.join(run, 'checkpoints', checkpoint_name(1))}" in capsys.readouterr().out
    else:
        code, out = torchrun(["--out", run, "--resume", "--quiet", "--parallel", "fsdp"])
        assert code == 0, out
    assert_close(f"next losses on {nproc}", torch.tensor(losses(fsdp)), torch.tensor(losses(run)), **TOL)


def test_consolidate_matches_single_process(single, fsdp, tmp_path, capsys):
    out = str(tmp_path / "model")
    cli.main(["consolidate", fsdp, out])  # a run folder: its latest checkpoint
    assert "model.safetensors" in capsys.readouterr().out
    merged = momoe.from_pretrained(out).state_dict()
    reference = momoe.from_pretrained(os.path.join(single, "checkpoints", checkpoint_name(STEPS))).state_dict()
    assert merged.keys() == reference.keys()
    for name in reference:
        assert_close(name, reference[name], merged[name], atol=1e-5, rtol=1e-4)


def test_failing_rank_ends_the_job(data_root, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        "from momoe import cli\n"
        "from momoe.train.trainer import Trainer\n"
        "step = Trainer.train_step\n"
        "def failing(self):\n"
        "    if os.environ['RANK'] == '1' and self.step == 1:\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return step(self)\n"
        "Trainer.train_step = failing\n"
        "cli.main(sys.argv[1:])\n")
    start = time.perf_counter()
    code, out = torchrun(["train", *model_args(data_root, tmp_path / "run", "--batch-size", 2)], module=[script])
    assert code != 0
    assert "injected failure on rank 1" in out
    assert time.perf_counter() - start < 60  # rank 0, waiting in a collective, was stopped


def test_bad_input(data_root, single, fsdp, tmp_path):
    args = model_args(data_root, tmp_path / "x", "--batch-size", 2)
    with pytest.raises(SystemExit, match="needs the 'ep' strategy"):
        cli.main(["train", *args, "--ep-size", "2"])
    with pytest.raises(SystemExit, match="single-process checkpoint"):  # a job of one rank
        cli.main(["train", "--out", single, "--resume", "--quiet", "--parallel", "fsdp"])
    with pytest.raises(SystemExit, match="momoe consolidate"):
        cli.main(["eval", fsdp])
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        cli.train_run(cli.build_parser().parse_args(["train", "--out", fsdp, "--resume"]),
                      momoe.train.parallel.Parallel(world_size=3))
    with pytest.raises(SystemExit, match="not a distributed checkpoint"):
        cli.main(["consolidate", single, str(tmp_path / "y")])


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known issue: under momoe train --parallel ep the first loss equals one process's (the "
                          "forward is exact) but the updates differ (losses ~1e-4 apart from step 2 on, with or "
                          "without clipping); momoe.distributed's own EP training test matches, so the difference "
                          "is in how the trainer combines EP gradients")
@pytest.mark.parametrize("clip", ["0", "1.0"], ids=["no-clip", "clip"])
def test_expert_parallel_matches_single_process(data_root, tmp_path, clip):
    """MoMa with its experts split over 2 ranks (expert choice over both ranks' rows) trains exactly as one
    process on the whole batch: packed rows carry no padding, so both see the same tokens."""
    def moma_args(out, *extra):
        args = model_args(data_root, out, *extra)
        args[args.index("mot")] = "moma"
        return args + ["--experts", "2", "--clip", clip]

    cli.main(["train", *moma_args(tmp_path / "single", "--batch-size", ROWS)])
    code, out = torchrun(moma_args(tmp_path / "ep", "--batch-size", ROWS // WORLD, "--parallel", "ep",
                                   "--ep-size", WORLD))
    assert code == 0, out[-3000:]
    ep, single = losses(tmp_path / "ep"), losses(tmp_path / "single")
    assert ep[0] == pytest.approx(single[0], abs=1e-5)  # the forward is exact (no padding in packed rows)
    assert ep == pytest.approx(single, abs=1e-5)
