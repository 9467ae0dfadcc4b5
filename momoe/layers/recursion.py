"""Mixture-of-Recursions routing (Bae et al. 2025, arXiv 2507.10524, §2.2): which tokens take each
recursion step of a shared block, and the packed layout the chosen tokens travel in.

- `RecursionExpertChoiceRouter` (expert choice): recursion step r is an "expert" with its own router
  ``g_t^r = alpha * sigmoid(theta_r · h_t^r)``; of the tokens still active after step r - 1 it keeps
  each sequence's top ``k_r = max(1, floor(capacity_r * n))`` (n tokens in the sequence), so the active
  sets shrink step by step (hierarchical filtering: a token that leaves never comes back).
- `RecursionTokenChoiceRouter` (token choice): one router, at the input of the recursion, gives every
  token its number of recursion steps up front: top-1 of a softmax over the N_r depths, with the
  balancing loss and router z-loss (`momoe.layers.routers.TokenChoiceRouter` with N_r "experts").
- `ActiveTokens`: a step's active tokens packed per sequence, what `gather_rows` takes them out into
  and `scatter_rows` writes their gated updates back from.

Choices where the paper leaves room, taken from the authors' code (github.com/raymin0223/
mixture_of_recursions, `expert_choice_router.py`, `token_choice_router.py` and the configs of the
paper's runs): linear routers without bias, initialised N(0, 0.02); the expert-choice gate is
``alpha * sigmoid(logit)`` with alpha = 0.1, the token-choice gate the chosen depth's softmax
probability (alpha = 1); the top-k is per sequence over its n tokens, not over the batch; the
capacity schedule defaults to ``capacity_r = (N_r - r) / N_r`` (r = 0 .. N_r - 1: all tokens take the
first step, a third the last of three).

Causal inference with expert choice (§2.2.1): a sequence's top-k depends on its future tokens, so
decoding decides every token on its own, ``sigmoid(logit) > 0.5``, and needs the routers trained for
it. "aux-loss" (the paper's default): a BCE term pushes the router's own sigmoid towards the top-k
decisions (coefficient 1e-3). "aux-router": a separate auxiliary router (`AuxRouter`, on the detached
hidden states, so only it learns from its BCE; trained jointly, as in the authors' code) decides
instead. A step of capacity 1 takes every active token in both modes.

Shape legend: B batch, L time, D d_model, K packed width (the most active tokens in a row), N_r
recursion steps, T tokens.
"""
import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from momoe.layers.routers import AuxRouter, RoutingContext, TokenChoiceRouter
from momoe.ops import sort_by_group

CAUSAL_ROUTERS = ("aux-loss", "aux-router")


def default_capacity(num_recursions: int) -> "list[float]":
    """The paper's capacity schedule: step r (0-based) keeps (N_r - r) / N_r of each sequence."""
    return [(num_recursions - r) / num_recursions for r in range(num_recursions)]


def check_capacity(capacity: Sequence[float]) -> None:
    """Each step keeps a fraction in (0, 1] of every sequence, never more than the step before."""
    if not capacity:
        raise ValueError("momoe: the recursion capacity schedule needs one value per recursion step, got none")
    if any(not 0.0 < c <= 1.0 for c in capacity):
        raise ValueError(f"momoe: recursion capacities must be in (0, 1], got {list(capacity)}")
    if any(b > a for a, b in zip(capacity, capacity[1:])):
        raise ValueError(f"momoe: recursion capacities must not increase from one step to the next "
                         f"(a step chooses among the tokens of the step before), got {list(capacity)}")


def _logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (..., D), weight: (D,) -> (...) in fp32, whatever the autocast state."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float()[None])[..., 0]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclasses.dataclass
class ActiveTokens:
    """The tokens active at a recursion step, packed per row: row b holds its c_b active tokens in time
    order in its *last* c_b columns, after K - c_b padding columns (K = max c_b).

    index (B, K) int64: flat token index (b * L + t) of each entry; a padding entry points to one of the
    row's inactive tokens (a valid index). valid (B, K) bool: False on padding.

    Right alignment keeps the attention kernel's built-in causal mask (query i sees keys j <= i + T - K)
    a superset of the true, positional causality also when the queries are a subset of the keys (as
    with recursive KV sharing), so the extra mask only has to remove keys, never add them.

    Example::

        >>> active = torch.tensor([[True, False, True], [False, True, False]])
        >>> packed = ActiveTokens.from_mask(active)
        >>> packed.index, packed.valid
        (tensor([[0, 2], [5, 4]]), tensor([[True, True], [False, True]]))
    """

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_mask(cls, active: torch.Tensor) -> "ActiveTokens":
        """active: (B, L) bool. One stable counting sort (`sort_by_group`) orders every row's tokens as
        inactive then active, each in time order; the last K columns are the packed rows."""
        if active.dim() != 2 or active.dtype != torch.bool:
            raise ValueError(f"momoe: active must be a (B, L) bool tensor, got {active.dtype} {tuple(active.shape)}")
        B, L = active.shape
        counts = active.sum(1)  # (B,)
        K = int(counts.max()) if B * L else 0
        rows = torch.arange(B, device=active.device)[:, None]
        order, _ = sort_by_group((2 * rows + active.long()).reshape(-1), 2 * B)  # group 2b: inactive, 2b+1: active
        index = order.view(B, L)[:, L - K:]
        valid = torch.arange(K, device=active.device) >= (K - counts)[:, None]
        return cls(index=index, valid=valid)

    @property
    def width(self) -> int:
        """K, the packed row length."""
        return self.index.shape[1]

    @property
    def flat_index(self) -> torch.Tensor:
        """(B * K,) int64: the entries' token rows, for gather_rows / scatter_rows."""
        return self.index.reshape(-1)

    def time(self, seq_len: int) -> torch.Tensor:
        """(B, K) int64: each entry's time step t within its row of length seq_len."""
        return self.index % seq_len


@dataclasses.dataclass
class RecursionSelection:
    """selected (B, L) bool: the tokens that take the step; gates (B, L) float32 (differentiable):
    alpha * sigmoid(logit), the weight of a selected token's update; logits (B, L) float32."""

    selected: torch.Tensor
    gates: torch.Tensor
    logits: torch.Tensor


class RecursionExpertChoiceRouter(nn.Module):
    r"""Expert-choice routing over recursion steps (MoR §2.2.1), one linear router per step.

    Training (``ctx.causal`` False): step r keeps, among each sequence's candidates (the tokens active
    after step r - 1), the ``k_r = max(1, floor(capacity[r] * n))`` highest logits, n being the number
    of tokens of the sequence (`num_tokens`; padding excluded). Its auxiliary loss, appended to
    ``ctx.aux_losses``: ``aux_loss_coef * BCE(decider logits, selected)`` over the candidates (the decider
    is the router itself for "aux-loss", the auxiliary router for "aux-router") plus
    ``z_loss_coef * mean(logit^2)`` (the router z-loss, logsumexp of a single logit).

    Causal (``ctx.causal`` True): a candidate is selected when its decider logit is > 0
    (sigmoid > 0.5); steps of capacity 1 take every candidate.

    Example::

        >>> router = RecursionExpertChoiceRouter(16, capacity=[1.0, 0.5])
        >>> x, candidates = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
        >>> first = router(x, candidates, 0, torch.tensor([6, 6]), RoutingContext())   # all 6 tokens
        >>> second = router(x, first.selected, 1, torch.tensor([6, 6]), RoutingContext())  # 3 per row
    """

    def __init__(self, d_model: int, capacity: Sequence[float], alpha: float = 0.1, causal_router: str = "aux-loss",
                 aux_loss_coef: float = 1e-3, z_loss_coef: float = 0.0, aux_hidden: Optional[int] = None,
                 init_std: float = 0.02) -> None:
        super().__init__()
        check_capacity(capacity)
        if causal_router not in CAUSAL_ROUTERS:
            raise ValueError(f"momoe: unknown causal_router {causal_router!r}; choose one of {CAUSAL_ROUTERS}")
        if alpha <= 0:
            raise ValueError(f"momoe: the router scale alpha must be > 0, got {alpha}")
        for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if value < 0:
                raise ValueError(f"momoe: {name} must be >= 0, got {value}")
        self.d_model, self.capacity, self.alpha = d_model, list(capacity), alpha
        self.causal_router, self.aux_loss_coef, self.z_loss_coef = causal_router, aux_loss_coef, z_loss_coef
        self.weight = nn.Parameter(torch.empty(len(self.capacity), d_model))  # theta_r, one row per step
        nn.init.normal_(self.weight, std=init_std)
        self.aux_router = None
        if causal_router == "aux-router":
            self.aux_router = AuxRouter(d_model, len(self.capacity), max(1, d_model // 4) if aux_hidden is None else aux_hidden)

    @property
    def num_recursions(self) -> int:
        return len(self.capacity)

    def num_selected(self, step: int, num_tokens: torch.Tensor) -> torch.Tensor:
        """(B,) int64: k = max(1, floor(capacity[step] * n)) of each row's n tokens (0 for an empty row)."""
        # round() first so that e.g. 0.6 * 5 = 2.9999999999999996 gives 3, not 2
        k = torch.floor(torch.round(self.capacity[step] * num_tokens.double(), decimals=9)).long()
        return torch.minimum(k.clamp(min=1), num_tokens)

    def forward(self, x: torch.Tensor, candidates: torch.Tensor, step: int, num_tokens: torch.Tensor,
                ctx: RoutingContext) -> RecursionSelection:
        """x: (B, L, D) hidden states entering step `step`; candidates: (B, L) bool, the tokens active
        after the step before (or every real token at step 0); num_tokens: (B,) tokens per row (the n
        of the capacity). Returns the RecursionSelection (a subset of the candidates)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model or candidates.shape != x.shape[:2]:
            raise ValueError(f"momoe: expected x (B, L, {self.d_model}) and candidates (B, L), got "
                             f"{tuple(x.shape)} and {tuple(candidates.shape)}")
        if not 0 <= step < self.num_recursions:
            raise ValueError(f"momoe: recursion step {step} out of range [0, {self.num_recursions})")
        logits = _logits(x, self.weight[step])  # (B, L)
        gates = self.alpha * torch.sigmoid(logits)
        decider = logits if self.aux_router is None else self.aux_logits(x, step)
        if self.capacity[step] >= 1.0:
            selected = candidates
        elif ctx.causal:
            selected = candidates & (decider > 0)
        else:
            selected = self.top_k(logits, candidates, self.num_selected(step, num_tokens))
        losses = [self.z_loss_coef * _masked_mean(logits.square(), candidates)]
        if not ctx.causal:
            bce = F.binary_cross_entropy_with_logits(decider, selected.float(), reduction="none")
            losses.append(self.aux_loss_coef * _masked_mean(bce, candidates))
        ctx.aux_losses.append(torch.stack(losses).sum())
        return RecursionSelection(selected=selected, gates=gates, logits=logits)

    def aux_logits(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """(B, L) fp32 logits of the auxiliary router of `step`, on the detached hidden states."""
        B, L, D = x.shape
        return self.aux_router(x.detach().reshape(B * L, D))[:, step].view(B, L)

    @staticmethod
    def top_k(logits: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the k[b] highest-logit candidates of each row b (k[b] <= candidates in row b)."""
        K = int(k.max()) if k.numel() else 0
        scores = logits.masked_fill(~candidates, float("-inf"))
        top = scores.topk(K, dim=1).indices  # (B, K)
        keep = torch.arange(K, device=logits.device) < k[:, None]
        return torch.zeros_like(candidates).scatter_(1, top, keep)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, capacity={self.capacity}, alpha={self.alpha}, "
                f"causal_router={self.causal_router!r}, aux_loss_coef={self.aux_loss_coef}, "
                f"z_loss_coef={self.z_loss_coef}")


@dataclasses.dataclass
class RecursionDepths:
    """depth (T,) int64 in [1, N_r]: recursion steps of each token; gates (T,) float32 (differentiable):
    alpha * the softmax probability of the chosen depth; tokens_per_depth (N_r,) int64."""

    depth: torch.Tensor
    gates: torch.Tensor
    tokens_per_depth: torch.Tensor


class RecursionTokenChoiceRouter(nn.Module):
    r"""Token-choice routing over recursion depths (MoR §2.2.1): ``softmax(W h_t)`` over the N_r depths at
    the input of the recursion, top-1. A `TokenChoiceRouter` with N_r experts and k = 1 does the work:
    its losses are the balancing loss ``N_r * sum_i f_i P_i`` (f_i: fraction of tokens given depth i,
    P_i: mean probability of depth i; coefficient 0.1 in the paper's runs) and the router z-loss
    ``mean logsumexp(logits)^2`` (1e-5), appended to ``ctx.aux_losses``. Decisions are per token, so
    training and decoding route alike.

    Example::

        >>> router = RecursionTokenChoiceRouter(16, num_recursions=3)
        >>> routing = router(torch.randn(10, 16), RoutingContext())
        >>> routing.depth   # (10,) values in 1..3
    """

    def __init__(self, d_model: int, num_recursions: int, alpha: float = 1.0, balance_loss_coef: float = 0.1,
                 z_loss_coef: float = 1e-5, init_std: float = 0.02) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"momoe: the router scale alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.router = TokenChoiceRouter(d_model, num_recursions, top_k=1, load_balance_coef=balance_loss_coef,
                                        z_loss_coef=z_loss_coef)
        nn.init.normal_(self.router.weight, std=init_std)

    @property
    def num_recursions(self) -> int:
        return self.router.num_experts

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RecursionDepths:
        """x: (T, D) the tokens entering the recursion -> RecursionDepths of the T tokens."""
        routing = self.router(x)
        ctx.aux_losses.append(routing.aux_loss)
        return RecursionDepths(depth=routing.expert_ids[:, 0] + 1, gates=self.alpha * routing.gates[:, 0],
                               tokens_per_depth=routing.stats.tokens_per_expert)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
