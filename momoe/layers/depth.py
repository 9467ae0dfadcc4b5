"""Depth routing: blocks that process only some tokens (Mixture-of-Depths, Raposo et al. 2024,
arXiv 2404.02258), as used by MoMa's MoD layers and the MoD family of the zoo.

A `DepthRouter` gives every token a scalar logit. In training each sequence's top-k routable tokens,
``k = ceil(capacity * routable tokens of the row)``, go through the block and the others skip it
(identity). A chosen token's residual update is scaled by its router weight,
``x + w(r) * (block(x) - x)`` (MoD eq. 1), which puts the router on the gradient path. Tokens that
are not routable (e.g. text in p-MoD / VideoLLM-MoD, which only route vision tokens) always go
through the block with weight 1.

Causal inference: top-k over a sequence depends on future tokens, so decoding routes every token on
its own with an auxiliary predictor (a small MLP on the detached residual stream trained by BCE to
predict top-k membership: MoD §3.5's second method, MoMa §2.4). `RoutingContext.causal` selects it.

Two execution paths give the same numbers for the same selection (tested):

- gathered (training): the chosen tokens of each row are gathered (`gather_rows`) into `(B, K)` rows
  in their original order, run through the block with their original positions (RoPE), and their
  weighted updates are scattered back (`scatter_rows`). Rows with fewer chosen tokens than K are
  padded, and the padding is masked out of attention and given weight 0.
- masked (causal routing and decoding): the block runs on every token, attention restricted to the
  chosen keys; the unchosen tokens' outputs are dropped. A decoding cache keeps every token's key with
  a mask of the chosen ones (`DepthCache`).

Shape legend: B batch, L time, T cached + new tokens, K chosen tokens per row (padded), D d_model.
"""
import dataclasses
import math
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from momoe.layers.attention import KVCache
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.routers import AuxRouter, RouterStats, RoutingContext
from momoe.ops import gather_rows, scatter_rows

GATES = ("sigmoid", "linear")


@dataclasses.dataclass
class DepthRouting:
    """selected (B, L) bool: tokens the block processes; weights (B, L) float32: scale of each token's
    residual update (the gate for chosen routable tokens, 1 for tokens that are not routable, 0 for
    skipped ones; differentiable); logits (B, L) float32: router logits; routable (B, L) bool."""

    selected: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    routable: torch.Tensor

    def stats(self) -> RouterStats:
        """One 'expert' (the block): tokens it processed, and the fractions skipped / processed."""
        processed = self.selected.sum()
        fraction = processed.float() / max(self.selected.numel(), 1)
        return RouterStats(tokens_per_expert=processed.view(1),
                           fraction_routed_to=torch.stack([1.0 - fraction, fraction]))


class DepthRouter(nn.Module):
    """MoD router: ``logit_t = w · x_t`` (fp32) and a per-sequence top-k over the routable tokens.

    gate: how a chosen token's update is weighted: "sigmoid" (``sigmoid(logit)``, MoMa's gating) or
    "linear" (the raw logit, as written in MoD eq. 1). capacity: fraction of each row's routable tokens
    processed, in (0, 1] (MoD's best setting is 12.5%). The auxiliary predictor (`predictor`, a 2-layer
    SiLU MLP with `aux_hidden` units, default ``max(1, d_model // 4)``) decides in causal mode.
    """

    def __init__(self, d_model: int, capacity: float, gate: str = "sigmoid", aux_hidden: Optional[int] = None) -> None:
        super().__init__()
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"momoe: a depth router's capacity must be in (0, 1], got {capacity}")
        if gate not in GATES:
            raise ValueError(f"momoe: unknown depth gate {gate!r}; choose one of {GATES}")
        aux_hidden = max(1, d_model // 4) if aux_hidden is None else aux_hidden
        self.d_model, self.capacity, self.gate = d_model, capacity, gate
        self.weight = nn.Parameter(torch.empty(1, d_model))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(d_model), 1.0 / math.sqrt(d_model))
        self.predictor = AuxRouter(d_model, 1, aux_hidden)

    def forward(self, x: torch.Tensor, routable: Optional[torch.Tensor], ctx: RoutingContext) -> DepthRouting:
        """x: (B, L, D); routable: (B, L) bool or None (every token routable)."""
        B, L, D = x.shape
        if D != self.d_model:
            raise ValueError(f"momoe: DepthRouter expects d_model {self.d_model}, got x of shape {tuple(x.shape)}")
        if routable is None:
            routable = torch.ones(B, L, dtype=torch.bool, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())[..., 0]  # (B, L)
        if ctx.causal:
            chosen = self.predictor(x.reshape(-1, D)).view(B, L) > 0
        else:
            chosen = self.top_k(logits, routable)
            if ctx.train_aux_routers and bool(routable.any()):
                predicted = self.predictor(x.detach().reshape(-1, D)).view(B, L)
                ctx.aux_losses.append(F.binary_cross_entropy_with_logits(predicted[routable], chosen[routable].float()))
        chosen = chosen & routable
        gate = torch.sigmoid(logits) if self.gate == "sigmoid" else logits
        weights = torch.where(routable, gate * chosen, torch.ones_like(gate))
        return DepthRouting(selected=chosen | ~routable, weights=weights, logits=logits, routable=routable)

    def top_k(self, logits: torch.Tensor, routable: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: each row's ceil(capacity * n) highest-logit routable tokens (n routable in the row)."""
        n = routable.sum(1, keepdim=True)  # (B, 1)
        k = torch.minimum(torch.ceil(n * self.capacity - 1e-6), n)
        scores = logits.masked_fill(~routable, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(logits.shape[1], device=logits.device).expand_as(order))
        return (rank < k) & routable

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, capacity={self.capacity}, gate={self.gate!r}"


@dataclasses.dataclass
class DepthCache:
    """Decoding state of a depth-routed block: the attention cache of every token (kv) and which of
    them the block processed (selected (B, T) bool; the others are masked out as keys)."""

    kv: KVCache = dataclasses.field(default_factory=KVCache)
    selected: Optional[torch.Tensor] = None


class BlockFn(Protocol):
    """The computation a MixtureOfDepths layer routes tokens around (e.g. TransformerBlock.process)."""

    def __call__(self, x: torch.Tensor, modality_ids: torch.Tensor, routing: Optional[ModalityRouting],
                 positions: torch.Tensor, cache: Optional[KVCache] = None,
                 attn_mask: Optional[torch.Tensor] = None, ctx: Optional[RoutingContext] = None) -> torch.Tensor: ...


def gather_selected(selected: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """selected: (B, L) bool -> index (B, K) positions of each row's selected tokens in order, padded
    with position 0, and valid (B, K) bool (False on padding); K = the most selected in a row."""
    B, L = selected.shape
    K = int(selected.sum(1).max()) if B * L else 0
    index = (~selected).to(torch.int8).argsort(dim=1, stable=True)[:, :K]  # selected first, in order
    valid = torch.arange(K, device=selected.device) < selected.sum(1, keepdim=True)
    return torch.where(valid, index, torch.zeros_like(index)), valid


class MixtureOfDepths(nn.Module):
    """Depth routing of one block (MoD): ``x + weights * (block(x) - x)`` on the selected tokens,
    identity on the others. The block owns this module and passes its computation in, so the block's
    weights keep their names (a dense checkpoint's layers load into MoD layers).

    routable_modalities: modality ids the router may skip (None: all); tokens of other modalities
    always go through the block. sorts_by_modality / num_modalities: whether the block's layers need
    the gathered tokens' ModalityRouting, rebuilt for them.
    """

    def __init__(self, router: DepthRouter, num_modalities: int, sorts_by_modality: bool,
                 routable_modalities: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.router = router
        self.num_modalities, self.sorts_by_modality = num_modalities, sorts_by_modality
        self.routable_modalities = None if routable_modalities is None else sorted(set(routable_modalities))

    def routable(self, modality_ids: torch.Tensor) -> Optional[torch.Tensor]:
        if self.routable_modalities is None:
            return None
        allowed = torch.tensor(self.routable_modalities, device=modality_ids.device)
        return torch.isin(modality_ids, allowed)

    def forward(self, block: BlockFn, x: torch.Tensor, modality_ids: torch.Tensor,
                routing: Optional[ModalityRouting], positions: torch.Tensor, cache: Optional[DepthCache],
                ctx: RoutingContext, name: str) -> torch.Tensor:
        """block: the routed computation; x: (B, L, D); modality_ids: (B, L); routing: all B * L tokens
        sorted by modality (or None); positions: (L,) absolute positions; cache: extended in place;
        name: the key of the router statistics in ctx. Returns (B, L, D)."""
        decision = self.router(x, self.routable(modality_ids), ctx)
        ctx.stats[f"{name}.depth"] = decision.stats()
        if cache is not None or ctx.causal:
            return self.forward_masked(block, x, modality_ids, routing, positions, decision, cache, ctx)
        return self.forward_gathered(block, x, modality_ids, positions, decision, ctx)

    def forward_gathered(self, block: BlockFn, x: torch.Tensor, modality_ids: torch.Tensor, positions: torch.Tensor,
                         decision: DepthRouting, ctx: RoutingContext) -> torch.Tensor:
        B, L, D = x.shape
        index, valid = gather_selected(decision.selected)  # (B, K)
        K = index.shape[1]
        flat = (index + L * torch.arange(B, device=x.device)[:, None]).reshape(-1)  # (B * K,)
        xs = gather_rows(x.reshape(B * L, D), flat).view(B, K, D)
        mod_s = modality_ids.gather(1, index)
        routing_s = ModalityRouting.from_ids(mod_s, self.num_modalities) if self.sorts_by_modality else None
        mask = None
        if not bool(valid.all()):
            mask = valid[:, None, :] | torch.eye(K, dtype=torch.bool, device=x.device)  # (B, K, K)
        update = block(xs, mod_s, routing_s, positions[index], attn_mask=mask, ctx=ctx) - xs
        weights = (decision.weights.gather(1, index) * valid).reshape(-1)
        return x + scatter_rows(update.reshape(B * K, D), flat, B * L, weight=weights).view(B, L, D).to(x.dtype)

    def forward_masked(self, block: BlockFn, x: torch.Tensor, modality_ids: torch.Tensor,
                       routing: Optional[ModalityRouting], positions: torch.Tensor, decision: DepthRouting,
                       cache: Optional[DepthCache], ctx: RoutingContext) -> torch.Tensor:
        B, L, _ = x.shape
        keys = decision.selected
        if cache is not None and cache.selected is not None:
            keys = torch.cat([cache.selected, keys], dim=1)  # (B, T)
        T = keys.shape[1]
        own = torch.zeros(L, T, dtype=torch.bool, device=x.device)
        own[torch.arange(L), torch.arange(T - L, T)] = True  # every query sees itself: no empty softmax row
        mask = keys[:, None, :] | own  # (B, L, T)
        out = block(x, modality_ids, routing, positions, cache=None if cache is None else cache.kv,
                    attn_mask=mask, ctx=ctx)
        if cache is not None:
            cache.selected = keys
        return x + (decision.weights[..., None] * (out - x)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"routable_modalities={self.routable_modalities}"
