"""SwiGLU against a per-token reference, and Mixture-of-Transformers' per-modality FFN invariants."""
import pytest
import torch
import torch.nn.functional as F

from momoe.layers.ffn import SwiGLU
from momoe.layers.modality_linear import ModalityRouting
from tests.utils import assert_close, case_id


def per_token_reference(ffn: SwiGLU, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """w2[m](silu(x W1[m]^T) * (x W3[m]^T)) token by token."""
    rows = []
    for x_t, m in zip(x.reshape(-1, ffn.d_model), modality.reshape(-1).tolist()):
        b13, b2 = (None if lin.bias is None else lin.bias[m] for lin in (ffn.w13, ffn.w2))
        h = F.linear(x_t, ffn.w13.weight[m], b13)
        rows.append(F.linear(F.silu(h[: ffn.d_ff]) * h[ffn.d_ff :], ffn.w2.weight[m], b2))
    return torch.stack(rows).reshape(x.shape)


def routing_for(modality: torch.Tensor, M: int):
    return ModalityRouting.from_ids(modality, M) if M > 1 else None


CASES = [dict(M=1, bias=False), dict(M=3, bias=False), dict(M=2, bias=True)]


@pytest.mark.parametrize("case", CASES, ids=[case_id(**c) for c in CASES])
def test_matches_per_token_reference(case):
    torch.manual_seed(0)
    M = case["M"]
    ffn = SwiGLU(12, 20, num_modalities=M, bias=case["bias"])
    x = torch.randn(2, 9, 12, requires_grad=True)
    modality = torch.randint(0, M, (2, 9))
    y = ffn(x, routing_for(modality, M))
    g = torch.randn_like(y)
    params = list(ffn.parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    y_ref = per_token_reference(ffn, x, modality)
    ref_grads = torch.autograd.grad(y_ref, [x, *params], g)
    assert_close("y", y_ref, y, atol=1e-5, rtol=1e-5)
    for name, r, o in zip(["dx", *(n for n, _ in ffn.named_parameters())], ref_grads, grads):
        assert_close(name, r, o, atol=1e-5, rtol=1e-5)


def test_identical_weights_equal_dense():
    torch.manual_seed(0)
    mot, dense = SwiGLU(16, 24, num_modalities=3, bias=True), SwiGLU(16, 24, bias=True)
    with torch.no_grad():
        for name, p in mot.named_parameters():
            p.copy_(p[0].expand_as(p))
            dense.get_parameter(name).copy_(p[:1])
    x = torch.randn(3, 8, 16)
    modality = torch.randint(0, 3, (3, 8))
    assert_close("y", dense(x), mot(x, ModalityRouting.from_ids(modality, 3)), atol=1e-5, rtol=1e-5)


def test_tokens_use_only_their_modality_weights():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24, num_modalities=3)
    x = torch.randn(2, 10, 16)
    modality = torch.randint(0, 3, (2, 10))
    routing = ModalityRouting.from_ids(modality, 3)
    before = ffn(x, routing)
    with torch.no_grad():
        ffn.w13.weight[1].add_(0.5)
        ffn.w2.weight[1].mul_(2.0)
    after = ffn(x, routing)
    assert_close("tokens of other modalities", before[modality != 1], after[modality != 1], atol=0, rtol=0)
    assert not torch.allclose(before[modality == 1], after[modality == 1])


def test_needs_routing():
    with pytest.raises(ValueError, match="ModalityRouting"):
        SwiGLU(8, 16, num_modalities=2)(torch.randn(2, 3, 8))


def test_autocast_bf16():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 32, num_modalities=2)
    x = torch.randn(2, 6, 16)
    modality = torch.randint(0, 2, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x, ModalityRouting.from_ids(modality, 2))
    assert y.dtype == torch.bfloat16
    assert_close("y", per_token_reference(ffn, x, modality), y, atol=5e-2, rtol=5e-2)
