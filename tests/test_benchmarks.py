"""The model benchmarks run end to end at toy sizes (their tables and JSON), so they cannot rot."""
import json
import subprocess
import sys

import pytest

TINY = ["--d-model", "64", "--n-layer", "2", "--vocab", "256", "--batch", "2", "--seqlen", "64", "--repeat", "1"]


@pytest.mark.parametrize("script, key, extra", [
    ("benchmarks.bench_models", "models", []),
    ("benchmarks.bench_mamba", "mamba", ["--decode-batch", "2", "--decode-tokens", "2"]),
])
def test_model_benchmark_runs(tmp_path, script, key, extra):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", script, *TINY, *extra, "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"environment", key} <= set(results) and results[key]
    assert "target <= 1.15x" in proc.stdout


def test_distributed_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_distributed", *TINY, "--experts", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["distributed"]
    assert [row["run"] for row in rows] == ["1 process", "2 processes DDP", "2 processes FSDP2", "2 processes EP",
                                            "2 processes FSDP2 + EP"]
    sent = [row["a2a MB/step/rank"] for row in rows]
    assert sent[:3] == [0, 0, 0] and sent[3] > 0 and sent[4] == sent[3]  # only expert parallelism sends tokens
