"""ModalityRMSNorm: one modality is RMSNorm; several scale each token by its own modality's row."""
import pytest
import torch

from momoe.layers.modality_norm import ModalityRMSNorm
from momoe.layers.norms import RMSNorm
from tests.utils import assert_close


def randomized(norm: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


def test_one_modality_is_rmsnorm():
    torch.manual_seed(0)
    norm = randomized(ModalityRMSNorm(16, 1, eps=1e-6))
    dense = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        dense.weight.copy_(norm.weight[0])
    x = torch.randn(2, 5, 16)
    assert torch.equal(norm(x), dense(x))
    assert torch.equal(norm(x, torch.zeros(2, 5, dtype=torch.long)), dense(x))


def test_each_token_uses_its_modality_row():
    torch.manual_seed(0)
    norm = randomized(ModalityRMSNorm(16, 3))
    x = torch.randn(2, 7, 16)
    modality = torch.randint(0, 3, (2, 7))
    y = norm(x, modality)
    for m in range(3):
        dense = RMSNorm(16)
        with torch.no_grad():
            dense.weight.copy_(norm.weight[m])
        rows = modality == m
        assert_close(f"modality {m}", dense(x)[rows], y[rows], atol=1e-6, rtol=1e-6)


def test_identical_rows_equal_dense():
    torch.manual_seed(0)
    norm = randomized(ModalityRMSNorm(8, 3))
    with torch.no_grad():
        norm.weight.copy_(norm.weight[0].expand(3, -1))
    dense = ModalityRMSNorm(8, 1)
    with torch.no_grad():
        dense.weight.copy_(norm.weight[:1])
    x = torch.randn(4, 6, 8)
    assert_close("y", dense(x), norm(x, torch.randint(0, 3, (4, 6))), atol=0, rtol=0)


def test_gradient_reaches_only_present_modalities():
    torch.manual_seed(0)
    norm = ModalityRMSNorm(8, 3)
    x = torch.randn(3, 4, 8, requires_grad=True)
    modality = torch.tensor([0, 2])[torch.randint(0, 2, (3, 4))]
    norm(x, modality).pow(2).sum().backward()
    assert norm.weight.grad[1].abs().max() == 0
    assert norm.weight.grad[0].abs().max() > 0 and norm.weight.grad[2].abs().max() > 0


def test_fp32_math_output_in_input_dtype():
    torch.manual_seed(0)
    norm = randomized(ModalityRMSNorm(32, 2))
    x = torch.randn(4, 32) * 100
    modality = torch.tensor([0, 1, 1, 0])
    y = norm(x.bfloat16(), modality)
    assert y.dtype == torch.bfloat16
    assert_close("bf16", norm(x.bfloat16().float(), modality), y, atol=2e-2, rtol=2e-2)


def test_input_checks():
    norm = ModalityRMSNorm(8, 2)
    with pytest.raises(ValueError, match="modality_ids"):
        norm(torch.randn(3, 8))
    with pytest.raises(ValueError, match="do not match"):
        norm(torch.randn(3, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_modalities"):
        ModalityRMSNorm(8, 0)
