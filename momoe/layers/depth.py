"""Depth routing: blocks that process only some tokens (Mixture-of-Depths, Raposo et al. 2024,
arXiv 2404.02258), as used by MoMa's MoD layers and the MoD family of the zoo.

A `DepthRouter` gives every token a scalar logit. In training each sequence's top-k routable tokens,
``k = ceil(capacity * routable tokens of the row)``, go through the block and the others skip it
(identity). A chosen token's residual update is scaled by its router weight,
``x + w(r) * (block(x) - x)`` (MoD eq. 1), which puts the router on the gradient path. Tokens that
are not routable (e.g. text in p-MoD / VideoLLM-MoD, which only route vision tokens) always go
through the block with weight 1.

Variants (all options of the same layer): `selection` says over which tokens the top-k runs ("sequence":
each row, MoD; "batch": the whole batch, MoMa §2.3; "span": each contiguous run of routable tokens, e.g.
one video frame or image, VideoLLM-MoD); `gate` maps the logit to the weight ("sigmoid", "linear",
"tanh_norm": p-MoD's ``0.2 tanh(r) + 1``); `weighting` says what the weight scales ("block": the
block's whole update; "ffn": only the FFN output, γ-MoD; "symmetric": the FFN output of processed
tokens and the state of skipped ones, p-MoD's STRing).

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
from momoe.layers.routers import AuxRouter, RouterStats, RoutingContext, default_aux_hidden
from momoe.ops import gather_rows, scatter_rows

GATES = ("sigmoid", "linear", "tanh_norm")
SELECTIONS = ("sequence", "batch", "span")
WEIGHTINGS = ("block", "ffn", "symmetric")


@dataclasses.dataclass
class DepthRouting:
    """selected (B, L) bool: tokens the block processes; weights (B, L) float32: scale of each token's
    residual update (the gate for chosen routable tokens, 1 for tokens that are not routable, 0 for
    skipped ones; differentiable); logits (B, L) float32: router logits; routable (B, L) bool;
    gate (B, L) float32: the gate of every routable token (1 elsewhere), for symmetric weighting."""

    selected: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    routable: torch.Tensor
    gate: Optional[torch.Tensor] = None

    def stats(self) -> RouterStats:
        """One 'expert' (the block): tokens it processed, and the fractions skipped / processed."""
        processed = self.selected.sum()
        fraction = processed.float() / max(self.selected.numel(), 1)
        return RouterStats(tokens_per_expert=processed.view(1),
                           fraction_routed_to=torch.stack([1.0 - fraction, fraction]))


class DepthRouter(nn.Module):
    """MoD router: ``logit_t = w · x_t`` (fp32) and a top-k over the routable tokens.

    capacity: fraction of the routable tokens of each selection group processed, in (0, 1] (MoD's best
    setting is 12.5%, MoMa's 25%); a layer may override it (`forward(capacity=...)`, so one router can
    be shared by layers of different capacities, as in γ-MoD). selection: "sequence" (top-k per row),
    "batch" (over the whole batch) or "span" (per contiguous run of routable tokens). gate: "sigmoid"
    (MoMa; a 2-way softmax as in γ-MoD is the same function of the logit difference), "linear" (the raw
    logit, MoD eq. 1) or "tanh_norm" (p-MoD: ``0.2 tanh(logit) + 1``, router initialised at zero so every
    weight starts at 1). The auxiliary predictor (`predictor`, an AuxRouter with `aux_hidden` units,
    MoMa's d_model / 2 by default) decides in causal mode.
    """

    def __init__(self, d_model: int, capacity: float, gate: str = "sigmoid", aux_hidden: Optional[int] = None,
                 selection: str = "sequence") -> None:
        super().__init__()
        check_capacity(capacity)
        if gate not in GATES:
            raise ValueError(f"momoe: unknown depth gate {gate!r}; choose one of {GATES}")
        if selection not in SELECTIONS:
            raise ValueError(f"momoe: unknown depth selection {selection!r}; choose one of {SELECTIONS}")
        aux_hidden = default_aux_hidden(d_model) if aux_hidden is None else aux_hidden
        self.d_model, self.capacity, self.gate, self.selection = d_model, capacity, gate, selection
        self.weight = nn.Parameter(torch.empty(1, d_model))
        if gate == "tanh_norm":
            nn.init.zeros_(self.weight)
        else:
            nn.init.uniform_(self.weight, -1.0 / math.sqrt(d_model), 1.0 / math.sqrt(d_model))
        self.predictor = AuxRouter(d_model, 1, aux_hidden)

    def forward(self, x: torch.Tensor, routable: Optional[torch.Tensor], ctx: RoutingContext,
                capacity: Optional[float] = None) -> DepthRouting:
        """x: (B, L, D); routable: (B, L) bool or None (every token routable); capacity: None for the
        router's own."""
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
            chosen = self.top_k(logits, routable, capacity)
            if ctx.train_aux_routers and bool(routable.any()):
                predicted = self.predictor(x.detach().reshape(-1, D)).view(B, L)
                ctx.aux_losses.append(F.binary_cross_entropy_with_logits(predicted[routable], chosen[routable].float()))
        chosen = chosen & routable
        gate = self.gate_of(logits)
        weights = torch.where(routable, gate * chosen, torch.ones_like(gate))
        return DepthRouting(selected=chosen | ~routable, weights=weights, logits=logits, routable=routable,
                            gate=torch.where(routable, gate, torch.ones_like(gate)))

    def gate_of(self, logits: torch.Tensor) -> torch.Tensor:
        if self.gate == "sigmoid":
            return torch.sigmoid(logits)
        if self.gate == "tanh_norm":
            return 0.2 * torch.tanh(logits) + 1.0
        return logits

    def top_k(self, logits: torch.Tensor, routable: torch.Tensor, capacity: Optional[float] = None) -> torch.Tensor:
        """(B, L) bool: in each selection group, the ceil(capacity * n) highest-logit routable tokens
        (n routable tokens in the group; ties go to the earlier token)."""
        capacity = self.capacity if capacity is None else capacity
        B, L = logits.shape
        group = self.selection_groups(routable).reshape(-1)  # (B * L,), -1 where not routable
        keep = group >= 0
        if not bool(keep.any()):
            return torch.zeros_like(routable)
        flat = torch.nonzero(keep)[:, 0]
        g, score = group[flat], logits.reshape(-1)[flat]
        order = torch.argsort(-score, stable=True)
        order = order[torch.argsort(g[order], stable=True)]  # by group, each group by descending logit
        counts = torch.bincount(g)
        starts = torch.cumsum(counts, 0) - counts
        k = torch.minimum(torch.ceil(counts * capacity - 1e-6), counts)
        rank = torch.arange(order.numel(), device=logits.device) - starts[g[order]]
        chosen = torch.zeros(B * L, dtype=torch.bool, device=logits.device)
        chosen[flat[order]] = rank < k[g[order]]
        return chosen.view(B, L)

    def selection_groups(self, routable: torch.Tensor) -> torch.Tensor:
        """(B, L) int64: the top-k group of each routable token (-1 for the others)."""
        B, L = routable.shape
        if self.selection == "batch":
            group = torch.zeros(B, L, dtype=torch.long, device=routable.device)
        elif self.selection == "sequence":
            group = torch.arange(B, device=routable.device)[:, None].expand(B, L)
        else:  # span: a new group where a run of routable tokens starts
            starts = routable.clone()
            starts[:, 1:] &= ~routable[:, :-1]
            group = starts.reshape(-1).long().cumsum(0).view(B, L) - 1
        return torch.where(routable, group, torch.full_like(group, -1))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, capacity={self.capacity}, gate={self.gate!r}, selection={self.selection!r}"


def check_capacity(capacity: float) -> None:
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"momoe: a depth router's capacity must be in (0, 1], got {capacity}")


def progressive_ratio_decay(n_layer: int, average: float = 0.5, dense_above: float = 0.85,
                            floor: float = 0.15) -> "tuple[list[int], list[float]]":
    """p-MoD's progressive ratio decay (shifted cosine, as in its released code): layer l's retention
    ratio is ``cos(l pi / (n_layer - 1)) / 2 + average``; layers above `dense_above` stay dense, the
    others become MoD layers keeping ``max(ratio, floor)`` of the vision tokens.

    Returns (mod_layers, capacities) for TransformerConfig.mod_layers / mod_capacity."""
    layers, capacities = [], []
    for layer in range(n_layer):
        ratio = math.cos(layer * math.pi / max(n_layer - 1, 1)) / 2 + average
        if ratio <= dense_above:
            layers.append(layer)
            capacities.append(round(max(ratio, floor), 6))
    return layers, capacities


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
                 attn_mask: Optional[torch.Tensor] = None, ctx: Optional[RoutingContext] = None,
                 ffn_scale: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def gather_selected(selected: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """selected: (B, L) bool -> index (B, K) positions of each row's selected tokens in order, padded
    with position 0, and valid (B, K) bool (False on padding); K = the most selected in a row."""
    B, L = selected.shape
    K = int(selected.sum(1).max()) if B * L else 0
    index = (~selected).to(torch.int8).argsort(dim=1, stable=True)[:, :K]  # selected first, in order
    valid = torch.arange(K, device=selected.device) < selected.sum(1, keepdim=True)
    return torch.where(valid, index, torch.zeros_like(index)), valid


class MixtureOfDepths(nn.Module):
    """Depth routing of one block (MoD): processed tokens get ``x + weights * (block(x) - x)``
    (weighting "block"), or the block with its FFN output scaled by the weights ("ffn", "symmetric");
    skipped tokens pass unchanged, or scaled by their gate ("symmetric"). The block owns this module and
    passes its computation in, so the block's weights keep their names (a dense checkpoint's layers
    load into MoD layers).

    router: the DepthRouter (may be shared by several layers); capacity: this layer's capacity (None:
    the router's). routable_modalities: modality ids the router may skip (None: all); tokens of other
    modalities always go through the block. sorts_by_modality / num_modalities: whether the block's
    layers need the gathered tokens' ModalityRouting, rebuilt for them.
    """

    def __init__(self, router: DepthRouter, num_modalities: int, sorts_by_modality: bool,
                 routable_modalities: Optional[Sequence[int]] = None, capacity: Optional[float] = None,
                 weighting: str = "block") -> None:
        super().__init__()
        if capacity is not None:
            check_capacity(capacity)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"momoe: unknown depth weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.router = router
        self.num_modalities, self.sorts_by_modality = num_modalities, sorts_by_modality
        self.routable_modalities = None if routable_modalities is None else sorted(set(routable_modalities))
        self.capacity, self.weighting = capacity, weighting

    def routable(self, modality_ids: torch.Tensor) -> Optional[torch.Tensor]:
        if self.routable_modalities is None:
            return None
        allowed = torch.tensor(self.routable_modalities, device=modality_ids.device)
        return torch.isin(modality_ids, allowed)

    def forward(self, block: BlockFn, x: torch.Tensor, modality_ids: torch.Tensor,
                routing: Optional[ModalityRouting], positions: torch.Tensor, cache: Optional[DepthCache],
                ctx: RoutingContext, name: str, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """block: the routed computation; x: (B, L, D); modality_ids: (B, L); routing: all B * L tokens
        sorted by modality (or None); positions: (L,) or (B, L) positions; cache: extended in place;
        name: the key of the router statistics in ctx; attn_mask: (B, L, L) keys each query may see
        besides causality (packed documents; not with a cache). Returns (B, L, D)."""
        decision = self.router(x, self.routable(modality_ids), ctx, capacity=self.capacity)
        ctx.stats[f"{name}.depth"] = decision.stats()
        if cache is not None or ctx.causal:
            y = self.forward_masked(block, x, modality_ids, routing, positions, decision, cache, ctx, attn_mask)
        else:
            y = self.forward_gathered(block, x, modality_ids, positions, decision, ctx, attn_mask)
        if self.weighting == "symmetric":  # STRing: skipped routable tokens are scaled by their gate too
            skipped = (decision.routable & ~decision.selected)[..., None]
            y = torch.where(skipped, (x * decision.gate[..., None]).to(x.dtype), y)
        return y

    def forward_gathered(self, block: BlockFn, x: torch.Tensor, modality_ids: torch.Tensor, positions: torch.Tensor,
                         decision: DepthRouting, ctx: RoutingContext,
                         attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, D = x.shape
        index, valid = gather_selected(decision.selected)  # (B, K)
        K = index.shape[1]
        flat = (index + L * torch.arange(B, device=x.device)[:, None]).reshape(-1)  # (B * K,)
        xs = gather_rows(x.reshape(B * L, D), flat).view(B, K, D)
        mod_s = modality_ids.gather(1, index)
        pos_s = positions[index] if positions.dim() == 1 else positions.gather(1, index)
        routing_s = ModalityRouting.from_ids(mod_s, self.num_modalities) if self.sorts_by_modality else None
        mask = None
        if attn_mask is not None:  # the chosen tokens' rows and columns of the documents' mask
            mask = attn_mask.gather(1, index[:, :, None].expand(B, K, L)).gather(2, index[:, None, :].expand(B, K, K))
        if not bool(valid.all()):
            mask = valid[:, None, :].expand(B, K, K) if mask is None else mask & valid[:, None, :]
        if mask is not None:
            mask = mask | torch.eye(K, dtype=torch.bool, device=x.device)  # (B, K, K): no empty softmax row
        weights = decision.weights.gather(1, index)  # (B, K)
        if self.weighting == "block":
            update = block(xs, mod_s, routing_s, pos_s, attn_mask=mask, ctx=ctx) - xs
        else:
            update = block(xs, mod_s, routing_s, pos_s, attn_mask=mask, ctx=ctx, ffn_scale=weights) - xs
            weights = torch.ones_like(weights)
        weights = (weights * valid).reshape(-1)
        return x + scatter_rows(update.reshape(B * K, D), flat, B * L, weight=weights).view(B, L, D).to(x.dtype)

    def forward_masked(self, block: BlockFn, x: torch.Tensor, modality_ids: torch.Tensor,
                       routing: Optional[ModalityRouting], positions: torch.Tensor, decision: DepthRouting,
                       cache: Optional[DepthCache], ctx: RoutingContext,
                       attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, _ = x.shape
        keys = decision.selected
        if cache is not None and cache.selected is not None:
            keys = torch.cat([cache.selected, keys], dim=1)  # (B, T)
        T = keys.shape[1]
        own = torch.zeros(L, T, dtype=torch.bool, device=x.device)
        own[torch.arange(L), torch.arange(T - L, T)] = True  # every query sees itself: no empty softmax row
        mask = keys[:, None, :] if attn_mask is None else keys[:, None, :] & attn_mask
        mask = mask | own  # (B, L, T)
        kv = None if cache is None else cache.kv
        if self.weighting == "block":
            out = block(x, modality_ids, routing, positions, cache=kv, attn_mask=mask, ctx=ctx)
            weights = decision.weights
        else:
            out = block(x, modality_ids, routing, positions, cache=kv, attn_mask=mask, ctx=ctx,
                        ffn_scale=decision.weights)
            weights = decision.selected.float()
        if cache is not None:
            cache.selected = keys
        return x + (weights[..., None] * (out - x)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, weighting={self.weighting!r}, "
                f"routable_modalities={self.routable_modalities}")
