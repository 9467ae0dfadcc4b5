"""Helpers shared by the tests: one assert_close and readable case ids."""
import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Tolerances of a kernel against the fp32 reference, by the dtype of the inputs.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float) -> None:
    """Compare `out` to `ref` in fp32, reporting the tensor name and the worst error."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref32, out32 = ref.detach().float(), out.detach().float()
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
