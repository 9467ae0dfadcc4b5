"""The SwiGLU feed-forward network (Shazeer 2020), with one set of weights per modality when
num_modalities > 1 (Mixture-of-Transformers' per-modality FFN).

Shape legend: B batch, L time, T tokens (B * L), D d_model, F d_ff.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from momoe.layers.modality_linear import ModalityLinear, ModalityRouting


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h: (..., 2F), the gate then the up projection -> silu(gate) * up: (..., F)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """y = w2(silu(gate) * up) with (gate, up) = w13(x); each token uses its modality's weights.

    w13: ModalityLinear D -> 2F (gate rows first, then up); w2: ModalityLinear F -> D.

    Example:
        >>> ffn = SwiGLU(16, 48, num_modalities=2)
        >>> modality_ids = torch.randint(0, 2, (2, 5))
        >>> y = ffn(torch.randn(2, 5, 16), ModalityRouting.from_ids(modality_ids, 2))
    """

    def __init__(self, d_model: int, d_ff: int, num_modalities: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.d_model, self.d_ff, self.num_modalities = d_model, d_ff, num_modalities
        self.w13 = ModalityLinear(d_model, 2 * d_ff, num_modalities, bias=bias)
        self.w2 = ModalityLinear(d_ff, d_model, num_modalities, bias=bias)

    def forward(self, x: torch.Tensor, routing: Optional[ModalityRouting] = None) -> torch.Tensor:
        """x: (..., D) in token order; routing: the tokens sorted by modality (needed when M > 1) -> (..., D).

        With several modalities the tokens are sorted once and both projections run on the sorted
        rows (the activation is per token), so the (T, 2F) hidden never goes through a permutation."""
        if self.num_modalities == 1:
            return self.w2(swiglu(self.w13(x)))
        if routing is None:
            raise ValueError("momoe: a SwiGLU with several modalities needs the tokens' ModalityRouting")
        xs = routing.sort(x.reshape(-1, self.d_model))  # (T, D) sorted by modality
        ys = self.w2.forward_sorted(swiglu(self.w13.forward_sorted(xs, routing)), routing)
        return routing.unsort(ys).reshape(x.shape)
