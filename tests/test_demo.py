"""The op demo (`momoe demo`) and the CLI: the modality-split MoE layer matches the reference backend."""
import torch

from momoe import cli, demo
from momoe.ops import use_backend
from tests.utils import assert_close


def test_modality_moe_ffn_matches_reference():
    torch.manual_seed(0)
    T, D, F, E, k = 96, 16, 24, 2, 2
    inputs = {
        "x": torch.randn(T, D),
        "modality": torch.randint(0, 3, (T,)),
        "router": torch.randn(D, 3 * E),
        "w_in": torch.randn(3 * E, D, F),
        "w_out": torch.randn(3 * E, F, D),
    }
    y, grads, sizes, _ = demo.run_once(inputs, E, k)
    with use_backend("reference"):
        y_ref, grads_ref, sizes_ref, _ = demo.run_once(inputs, E, k)
    assert int(sizes.sum()) == T * k
    assert torch.equal(sizes, sizes_ref)
    # Tokens only reach experts of their own modality.
    for m in range(3):
        own = int((inputs["modality"] == m).sum()) * k
        assert int(sizes[m * E : (m + 1) * E].sum()) == own
    assert_close("y", y_ref, y, atol=1e-4, rtol=1e-4)
    for name in grads:
        assert_close("d" + name, grads_ref[name], grads[name], atol=1e-4, rtol=1e-4)


def test_cli_demo_and_ops(capsys):
    cli.main(["demo", "--tokens", "128", "--top-k", "2"])
    out = capsys.readouterr().out
    assert "speech" in out and "max |kernel - reference|" in out
    cli.main(["ops"])
    out = capsys.readouterr().out
    assert "torch.ops.momoe.grouped_gemm" in out and "torch.ops.momoe.selective_scan_fwd" in out
