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
from momoe.data import load_dataset
from momoe.train.checkpointing import LATEST_FILE, checkpoint_name
from momoe.train.log import read_log
from momoe.train.specs import family_config
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


def grad_norms(run) -> list:
    """The norm of the whole gradient at every step (before clipping): Adam's updates hardly change
    when a gradient is scaled, this does."""
    return [record["grad_norm"] for record in read_log(os.path.join(run, "log.jsonl"))]


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
    assert_close("ddp gradient norms", torch.tensor(grad_norms(single)), torch.tensor(grad_norms(run)), **TOL)
    logged = read_log(os.path.join(run, "log.jsonl"))
    assert [r["tokens_seen"] for r in logged] == [ROWS * 32 * s for s in range(1, STEPS + 1)]  # global tokens
    # rank 0 wrote the usual single-process checkpoint of the unwrapped model
    model = momoe.from_pretrained(os.path.join(run, "checkpoints", checkpoint_name(STEPS)))
    assert not any(name.startswith("module.") for name in model.state_dict())


def test_fsdp_matches_single_process(single, fsdp):
    assert len(losses(fsdp)) == STEPS
    assert_close("fsdp losses", torch.tensor(losses(single)), torch.tensor(losses(fsdp)), **TOL)
    assert_close("fsdp gradient norms", torch.tensor(grad_norms(single)), torch.tensor(grad_norms(fsdp)), **TOL)
    assert os.path.isfile(os.path.join(fsdp, "checkpoints", checkpoint_name(STEPS), ".metadata"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_accumulation_matches_single_process(data_root, single, tmp_path, strategy):
    """2 micro-batches of 1 row per rank and update (the gradients averaged over the ranks once, after the
    second) train as one process on the global batch of 4 rows."""
    run = str(tmp_path / strategy)
    code, out = torchrun(model_args(data_root, run, "--batch-size", ROWS // WORLD // 2, "--grad-accum", 2,
                                    "--parallel", strategy))
    assert code == 0, out
    assert_close(f"{strategy} losses", torch.tensor(losses(single)), torch.tensor(losses(run)), **TOL)
    assert_close(f"{strategy} gradient norms", torch.tensor(grad_norms(single)), torch.tensor(grad_norms(run)), **TOL)


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
    with pytest.raises(SystemExit, match="needs the 'ep' or 'fsdp' strategy"):
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


def _moma_config(data_root, tmp_path, capacity_factor: float) -> str:
    """config.json of model_args's MoMa (2 experts per modality) with the given capacity factor."""
    vocab = load_dataset(data_root, "train").vocab
    config = family_config("moma", vocab, d_model=32, n_layer=2, n_heads=2, experts=2).replace(
        capacity_factor=capacity_factor)
    path = tmp_path / f"moma-cf{capacity_factor}.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def _train_moma(data_root, tmp_path, config: str, clip: str, strategy: str = "ep"):
    """(one process on the global batch, 2 expert-parallel ranks on half of it each): their (losses,
    gradient norms). strategy "fsdp": the other parameters sharded with FSDP2 instead of replicated."""
    def moma_args(out, *extra):
        args = model_args(data_root, out, *extra)
        i = args.index("--family")
        return args[:i] + ["--model", config] + args[i + 2:] + ["--clip", clip]

    cli.main(["train", *moma_args(tmp_path / "single", "--batch-size", ROWS)])
    code, out = torchrun(moma_args(tmp_path / "ep", "--batch-size", ROWS // WORLD, "--parallel", strategy,
                                   "--ep-size", WORLD))
    assert code == 0, out[-3000:]
    assert f"training on 2 processes ({strategy}, cpu), MoMa's experts over groups of 2 ranks" in out
    return [(losses(run), grad_norms(run)) for run in (tmp_path / "single", tmp_path / "ep")]


@pytest.mark.parametrize("strategy, clip", [("ep", "0"), ("ep", "1.0"), ("fsdp", "1.0")],
                         ids=["ep-no-clip", "ep-clip", "fsdp+ep-clip"])
def test_expert_parallel_matches_single_process(data_root, tmp_path, strategy, clip):
    """MoMa with its experts split over 2 ranks trains as one process on the whole batch: every rank's
    expert shards get the gradient of the global mean loss (all_to_all backward, then the data-parallel
    mean), the other parameters DDP's (or FSDP2's shards of it), and clipping uses the norm of the whole
    gradient.

    capacity_factor = 2 = experts per modality: every expert takes every token of its modality, so the
    run does not hinge on how expert choice breaks ties (see the next test); the dispatch, combine and
    gates still go through both ranks."""
    single, ep = _train_moma(data_root, tmp_path, _moma_config(data_root, tmp_path, 2.0), clip, strategy)
    assert len(ep[0]) == STEPS
    assert_close("expert-parallel losses", torch.tensor(single[0]), torch.tensor(ep[0]), **TOL)
    assert_close("expert-parallel gradient norms", torch.tensor(single[1]), torch.tensor(ep[1]), **TOL)


def test_fsdp_expert_parallel_checkpoint_resumes_on_one_process(data_root, tmp_path, capsys):
    """A checkpoint of `--parallel fsdp --ep-size 2` (experts and the other parameters sharded
    differently) continues on one plain process with the next losses of the 2-rank run."""
    config = _moma_config(data_root, tmp_path, 2.0)
    args = model_args(data_root, tmp_path / "run", "--batch-size", ROWS // WORLD, "--parallel", "fsdp",
                      "--ep-size", WORLD, "--checkpoint-interval", 1, "--keep-checkpoints", STEPS)
    i = args.index("--family")
    code, out = torchrun(args[:i] + ["--model", config] + args[i + 2:])
    assert code == 0, out[-3000:]
    run = _rewound(str(tmp_path / "run"), tmp_path, "resumed")
    cli.main(["train", "--out", run, "--resume", "--quiet"])
    assert "resuming from" in capsys.readouterr().out
    assert_close("next losses", torch.tensor(losses(tmp_path / "run")), torch.tensor(losses(run)), **TOL)


def test_expert_parallel_expert_choice_over_both_ranks(data_root, tmp_path):
    """With capacity_factor 1 each expert takes the top half of its modality's tokens over both ranks'
    rows: the first step (same weights) equals one process's. Later steps agree to ~1e-4, not exactly:
    tokens with identical hidden states (e.g. every document's first token) tie in the router scores,
    and rounding differences of ~1e-7 between a 2-row and a 4-row batch decide which of them an expert
    takes at its capacity boundary, which is a different but equally valid choice."""
    (single, single_norms), (ep, ep_norms) = _train_moma(data_root, tmp_path,
                                                         _moma_config(data_root, tmp_path, 1.0), "1.0")
    assert ep[0] == pytest.approx(single[0], abs=1e-5)
    assert ep_norms[0] == pytest.approx(single_norms[0], rel=1e-5)  # the first gradient too
    assert ep == pytest.approx(single, abs=2e-3)
