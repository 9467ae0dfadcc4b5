"""Linear layers with one weight per modality (Mixture-of-Transformers / Mixture-of-Mamba style
deterministic routing: every token uses its own modality's weights).

Tokens are sorted by modality once per forward (ModalityRouting, shared by every layer), each
projection is one grouped GEMM over the sorted tokens, and the result is scattered back.

Shape legend: T tokens, M modalities, K input features, N output features.
"""
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from momoe.ops import gather_rows, grouped_gemm, scatter_rows, sort_by_group


@dataclasses.dataclass
class ModalityRouting:
    """The tokens of one forward sorted by modality.

    modality (T,): each token's modality id; order (T,): token positions sorted by modality
    (stable); sorted_modality (T,): modality[order]; sizes (M,): tokens per modality.
    """

    modality: torch.Tensor
    order: torch.Tensor
    sorted_modality: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def from_ids(cls, modality_ids: torch.Tensor, num_modalities: int) -> "ModalityRouting":
        """modality_ids: any shape, integer ids in [0, num_modalities) (checked by sort_by_group)."""
        flat = modality_ids.reshape(-1)
        order, sizes = sort_by_group(flat, num_modalities)
        return cls(modality=flat, order=order, sorted_modality=flat[order], sizes=sizes)

    @property
    def num_tokens(self) -> int:
        return self.modality.shape[0]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) in token order -> (T, K) sorted by modality."""
        return gather_rows(x, self.order)

    def unsort(self, y: torch.Tensor) -> torch.Tensor:
        """y: (T, N) sorted by modality -> (T, N) in token order."""
        return scatter_rows(y, self.order, self.num_tokens)


def autocast_operands(x: torch.Tensor, w: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """The operands in autocast's dtype when autocast is on (as F.linear would get them)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), w.to(dtype)
    return x, w


class ModalityLinear(nn.Module):
    """y = x @ weight[m]^T + bias[m] for each token's modality m.

    weight: (M, N, K) (nn.Linear's layout per modality); bias: (M, N) or None. With M = 1 this is
    an nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, num_modalities: int, bias: bool = True) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"momoe: num_modalities must be >= 1, got {num_modalities}")
        self.in_features, self.out_features, self.num_modalities = in_features, out_features, num_modalities
        self.weight = nn.Parameter(torch.empty(num_modalities, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_modalities, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for every modality."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, routing: Optional[ModalityRouting] = None) -> torch.Tensor:
        """x: (..., K) in token order (T tokens in all) -> (..., N)."""
        if self.num_modalities == 1:
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        if routing is None:
            raise ValueError("momoe: a ModalityLinear with several modalities needs the tokens' ModalityRouting")
        y = routing.unsort(self.forward_sorted(routing.sort(x.reshape(-1, self.in_features)), routing))
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_sorted(self, xs: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        """xs: (T, K) already sorted by modality -> (T, N), still sorted."""
        xs, w = autocast_operands(xs, self.weight)
        ys = grouped_gemm(xs, w, routing.sizes, trans_w=True)
        if self.bias is not None:
            ys = ys + self.bias.to(ys.dtype).index_select(0, routing.sorted_modality)
        return ys

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_modalities={self.num_modalities}, bias={self.bias is not None}")
