"""Helpers shared by the tests: one assert_close, readable case ids, and the CUDA device parameter."""
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Tolerances of a kernel against the fp32 reference, by the dtype of the inputs.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float) -> None:
    """Compare `out` to `ref` in fp32 (on ref's device), reporting the tensor name and the worst error."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref32, out32 = ref.detach().float(), out.detach().float().to(ref.device)
    if ref32.numel() == 0:
        return
    err = (ref32 - out32).abs()
    bound = atol + rtol * ref32.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{name}: max abs error {err.max().item():.3e} (at flat index {worst.item()}: "
        f"ref {ref32.flatten()[worst].item():.5g}, got {out32.flatten()[worst].item():.5g}), "
        f"atol={atol}, rtol={rtol}"
    )


def case_id(**parts) -> str:
    """A readable parametrisation id, e.g. case_id(B=2, D=64, L=17, dtype=torch.bfloat16) -> 'B2-D64-L17-bf16'."""
    out = []
    for key, value in parts.items():
        if isinstance(value, torch.dtype):
            out.append(DTYPE_NAMES.get(value, str(value)))
        elif isinstance(value, bool):
            if value:
                out.append(key)
        else:
            out.append(f"{key}{value}")
    return "-".join(out)


# A `device` parametrisation: the CPU, and the GPU (skipped where there is none).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_assert_outputs(programs: Dict[str, str], timeout: float = 600.0) -> Dict[str, str]:
    """Run each Python program, which must fail a CUDA device-side assertion, in a fresh interpreter
    (the assertion leaves the process's CUDA context unusable), all at once; returns each program's
    stdout + stderr, after checking that it failed with a device-side assertion."""
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], cwd=_REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        for name, code in programs.items()
    }
    outputs = {name: proc.communicate(timeout=timeout)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode != 0 and "device-side assert" in outputs[name], (
            f"{name}: expected a device-side assertion, got exit code {proc.returncode}:\n{outputs[name][-3000:]}"
        )
    return outputs
