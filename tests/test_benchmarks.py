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
