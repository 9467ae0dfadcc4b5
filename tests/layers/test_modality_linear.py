"""ModalityLinear against a per-token loop over nn.functional.linear."""
import pytest
import torch
import torch.nn.functional as F

from momoe.layers import ModalityLinear, ModalityRouting
from tests.utils import assert_close


def per_token_reference(layer: ModalityLinear, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    rows = [F.linear(x_t, layer.weight[m], None if layer.bias is None else layer.bias[m])
            for x_t, m in zip(x.reshape(-1, x.shape[-1]), modality.reshape(-1).tolist())]
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,present", [(3, [0, 1, 2]), (3, [2]), (2, [0, 1])], ids=["all", "one-of-three", "two"])
def test_matches_per_token_reference(M, present, bias):
    torch.manual_seed(0)
    layer = ModalityLinear(12, 7, M, bias=bias)
    x = torch.randn(3, 11, 12, requires_grad=True)
    modality = torch.tensor(present)[torch.randint(0, len(present), (3, 11))]
    y = layer(x, ModalityRouting.from_ids(modality, M))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    ref_layer = ModalityLinear(12, 7, M, bias=bias)
    ref_layer.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    y_ref = per_token_reference(ref_layer, x_ref, modality)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *ref_layer.parameters()], g)
    assert_close("y", y_ref, y, atol=1e-5, rtol=1e-5)
    for name, r, o in zip(["dx", "dweight", "dbias"], ref_grads, grads):
        assert_close(name, r, o, atol=1e-5, rtol=1e-5)


def test_one_modality_is_nn_linear():
    layer = ModalityLinear(5, 4, 1)
    x = torch.randn(2, 3, 5)
    assert torch.equal(layer(x), F.linear(x, layer.weight[0], layer.bias[0]))


def test_needs_routing_and_valid_ids():
    layer = ModalityLinear(5, 4, 3)
    with pytest.raises(ValueError, match="ModalityRouting"):
        layer(torch.randn(2, 5))
    with pytest.raises((RuntimeError, ValueError), match="group_ids"):
        ModalityRouting.from_ids(torch.tensor([0, 3]), 3)


def test_autocast_bf16():
    torch.manual_seed(0)
    layer = ModalityLinear(16, 8, 2)
    x = torch.randn(10, 16)
    routing = ModalityRouting.from_ids(torch.randint(0, 2, (10,)), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, routing)
    assert y.dtype == torch.bfloat16
    assert_close("y", per_token_reference(layer, x, routing.modality), y, atol=5e-2, rtol=5e-2)
