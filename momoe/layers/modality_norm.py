"""RMSNorm with one weight per modality (Mixture-of-Transformers gives each modality its own norms).

Shape legend: M modalities, D features.
"""
from typing import Optional

import torch
from torch import nn


class ModalityRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight[m] for each token's modality m, computed in fp32 and
    returned in x's dtype.

    weight: (M, D). With M = 1 this is RMSNorm with weight[0] (and modality_ids may be None).

    Example:
        >>> norm = ModalityRMSNorm(8, num_modalities=2)
        >>> y = norm(torch.randn(2, 5, 8), torch.randint(0, 2, (2, 5)))
    """

    def __init__(self, dim: int, num_modalities: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"momoe: num_modalities must be >= 1, got {num_modalities}")
        self.dim, self.num_modalities, self.eps = dim, num_modalities, eps
        self.weight = nn.Parameter(torch.ones(num_modalities, dim))

    def forward(self, x: torch.Tensor, modality_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (..., D); modality_ids: (...) integer ids in [0, M) (needed when M > 1) -> (..., D)."""
        if self.num_modalities == 1:
            weight = self.weight[0]
        elif modality_ids is None:
            raise ValueError("momoe: a ModalityRMSNorm with several modalities needs the tokens' modality_ids")
        elif modality_ids.shape != x.shape[:-1]:
            raise ValueError(f"momoe: modality_ids of shape {tuple(modality_ids.shape)} do not match x of shape "
                             f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
        else:
            weight = self.weight[modality_ids]  # (..., D)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, num_modalities={self.num_modalities}, eps={self.eps}"
