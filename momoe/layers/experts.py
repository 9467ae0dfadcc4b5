"""A bank of SwiGLU experts run as two grouped GEMMs, and the dispatch / combine around it.

Every MoE in the zoo (MoMa's expert-choice groups, token-choice top-k, MixER's top-1) runs its
experts the same way: the routed (token, expert) rows are gathered grouped by expert
(`gather_rows`), each projection is one `grouped_gemm` over those rows, and the outputs are summed
back into their tokens weighted by the gates (`scatter_rows`). Tokens that no expert processed get 0
(the block's residual carries them).

Shape legend: T tokens, D d_model, F d_ff, E experts, k experts per token, R routed rows.
"""
import math

import torch
from torch import nn

from momoe.layers.ffn import swiglu
from momoe.layers.modality_linear import autocast_operands
from momoe.ops import gather_rows, grouped_gemm, scatter_rows, sort_by_group


class ExpertFFN(nn.Module):
    """E SwiGLU experts: expert e maps x to ``w2[e] @ (silu(gate) * up)`` with ``(gate, up) = w13[e] @ x``.

    w13: `[E, 2F, D]` (nn.Linear's layout per expert, gate rows first, then up, as in
    `momoe.layers.ffn.SwiGLU`); w2: `[E, D, F]`. No biases. Each expert is initialised like a pair of
    nn.Linear layers.

    Example::

        >>> experts = ExpertFFN(16, 32, num_experts=4)
        >>> x_sorted = torch.randn(10, 16)               # rows already grouped by expert
        >>> y = experts(x_sorted, torch.tensor([3, 0, 5, 2]))   # [10, 16]
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if value < 1:
                raise ValueError(f"momoe: ExpertFFN needs {name} >= 1, got {value}")
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (uniform in ±1/sqrt(fan_in)) for every expert."""
        nn.init.uniform_(self.w13, -1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w2, -1.0 / math.sqrt(self.d_ff), 1.0 / math.sqrt(self.d_ff))

    def forward(self, x_sorted: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Run each expert on its rows.

        Args:
            x_sorted (Tensor): rows of shape `[R, D]`, grouped by expert (expert 0's rows first).
            sizes (Tensor): rows per expert of shape `[E]`, integer, summing to R (zeros allowed).

        Returns:
            Tensor of shape `[R, D]`, still grouped by expert (autocast's dtype under autocast).
        """
        xs, w13 = autocast_operands(x_sorted, self.w13)
        h = swiglu(grouped_gemm(xs, w13, sizes, trans_w=True))  # [R, F]
        h, w2 = autocast_operands(h, self.w2)
        return grouped_gemm(h, w2, sizes, trans_w=True)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}"


def run_experts(
    x: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor, sizes: torch.Tensor, experts: ExpertFFN
) -> torch.Tensor:
    """Gather the routed rows, run the bank, sum the gated outputs back into their tokens.

    ``y[t] = sum over rows r with token_index[r] == t of gates[r] * experts[e(r)](x[t])``, where the
    expert e(r) of a row follows from `sizes` (rows are grouped by expert).

    Args:
        x (Tensor): tokens of shape `[T, D]`.
        token_index (Tensor): token of each routed row, shape `[R]`, rows grouped by expert
            (e.g. `ExpertChoiceRouter`'s routing.token_index).
        gates (Tensor): weight of each row, shape `[R]` (differentiable).
        sizes (Tensor): rows per expert, shape `[E]`, summing to R.
        experts (ExpertFFN): the bank.

    Returns:
        Tensor of shape `[T, D]`; tokens routed to no expert are 0.
    """
    if token_index.shape != gates.shape or token_index.dim() != 1:
        raise ValueError(
            f"momoe: token_index and gates must both have shape (R,), got {tuple(token_index.shape)} "
            f"and {tuple(gates.shape)}"
        )
    if sizes.shape != (experts.num_experts,):
        raise ValueError(
            f"momoe: sizes must have shape ({experts.num_experts},) (one per expert), got {tuple(sizes.shape)}"
        )
    ys = experts(gather_rows(x, token_index), sizes)  # [R, D]
    return scatter_rows(ys, token_index, x.shape[0], weight=gates.float())


def dispatch_combine(
    x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, experts: ExpertFFN
) -> torch.Tensor:
    """Token-choice dispatch and combine: ``y[t] = sum_j gates[t, j] * experts[expert_ids[t, j]](x[t])``.

    The k copies of every token are sorted by expert with `sort_by_group` (stable), gathered, run
    through the bank and scatter-added back weighted by their gates.

    Args:
        x (Tensor): tokens of shape `[T, D]`.
        expert_ids (Tensor): expert of each token, shape `[T]` (top-1) or `[T, k]`, integers in `[0, E)`.
        gates (Tensor): gate of each (token, slot), same shape as `expert_ids` (differentiable).
        experts (ExpertFFN): the bank of E experts.

    Returns:
        Tensor of shape `[T, D]`.

    Example::

        >>> experts = ExpertFFN(16, 32, num_experts=4)
        >>> x = torch.randn(6, 16)
        >>> gates, expert_ids = torch.randn(6, 4).softmax(-1).topk(2, dim=-1)
        >>> y = dispatch_combine(x, expert_ids, gates, experts)   # [6, 16]
    """
    if expert_ids.shape != gates.shape:
        raise ValueError(
            f"momoe: gates must have the shape of expert_ids {tuple(expert_ids.shape)}, got {tuple(gates.shape)}"
        )
    if expert_ids.dim() not in (1, 2) or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"momoe: expert_ids must have shape (T,) or (T, k) with T = {x.shape[0]} tokens, "
            f"got {tuple(expert_ids.shape)}"
        )
    k = 1 if expert_ids.dim() == 1 else expert_ids.shape[1]
    order, sizes = sort_by_group(expert_ids, experts.num_experts)  # [T*k], [E]
    return run_experts(x, order // k, gates.reshape(-1)[order], sizes, experts)
