"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): a recursive transformer whose routers
give every token its own number of passes through one shared block of layers.

Layout (middle-cycle sharing, the paper's choice): embedding -> unique first layer -> the shared block
of `recursion_layers` layers, up to N_r recursion steps -> unique last layer -> norm -> LM head
("cycle" sharing drops the unique layers). Every layer is a `TransformerBlock` (attention, SwiGLU,
RMSNorm of `momoe.layers`); one token space for all modalities (the model is dense).

A recursion step runs the shared block on the step's active tokens only: they are gathered
(`gather_rows`, packed per sequence in time order, `ActiveTokens`), attend among themselves, and their
outputs are scattered back (`scatter_rows`). With h the hidden states entering step r and f the shared
block (its layers *with* their residual connections, as f(h; Phi') in the paper's equations and the
block in the authors' code):

- expert choice: ``h <- h + g_r * f(h)`` on the selected tokens, h unchanged on the others (§2.2.1;
  g_r = alpha * sigmoid(theta_r · h), alpha = 0.1);
- token choice: a token given depth d goes ``h^1 -> f(h^1) -> f(f(h^1)) ...`` for d steps, and leaves
  with ``h^1 + g * f^d(h^1)`` (h^1: the recursion's input, g: alpha * its depth probability). The
  intermediate steps are ungated, as in the authors' code.

KV strategies (§2.3): "recursion-wise" caching: step r attends to, and caches, the keys and values of
the tokens active at step r only (its own KV cache per step). "recursive-sharing": only the first step
(which every token takes) computes and caches keys and values; a later step's queries, from its active
tokens, attend to the first step's keys of every earlier token (the authors' implementation, which also
discards the later steps' own keys).

Causal inference: the training-time expert choice (per-sequence top-k) looks at future tokens;
`causal_routing=True` (forced whenever a decoding cache is used) decides every token on its own (see
`momoe.layers.recursion`). Token choice is causal either way.

Shape legend: B batch, L time, D d_model, K packed width of a step, T cached keys, N_r recursion steps.
"""
import dataclasses
from typing import List, Optional

import torch
from torch import nn

from momoe.layers.attention import KVCache
from momoe.layers.ffn import SwiGLU
from momoe.layers.modality_norm import ModalityRMSNorm
from momoe.layers.recursion import ActiveTokens, RecursionExpertChoiceRouter, RecursionTokenChoiceRouter
from momoe.layers.routers import RouterStats, RoutingContext
from momoe.models.modeling_utils import (IGNORE_INDEX, ModelOutput, PreTrainedModel, check_inputs,
                                         modality_routing)
from momoe.models.mor.configuration_mor import MoRConfig
from momoe.models.packing import Documents
from momoe.models.transformer.configuration_transformer import TransformerConfig
from momoe.models.transformer.modeling_transformer import TransformerBlock
from momoe.ops import gather_rows, scatter_rows


@dataclasses.dataclass
class RecursionCache:
    """One recursion step's keys and values: a KVCache per shared layer, and for each cached entry whether
    it is a token of the step (valid (B, T) bool; padding of rows with fewer active tokens stays in the
    cache, masked out) and its position (positions (B, T) int64)."""

    layers: List[KVCache]
    valid: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None

    def extend(self, valid: torch.Tensor, positions: torch.Tensor) -> None:
        """Record the entries of a call: valid, positions (B, K) (their keys go into `layers`)."""
        if self.valid is None:
            self.valid, self.positions = valid, positions
        else:
            self.valid = torch.cat([self.valid, valid], dim=1)
            self.positions = torch.cat([self.positions, positions], dim=1)


class SharedKV(KVCache):
    """Recursive KV sharing: a read-only view of the first recursion step's cache of the same layer;
    `update` ignores the step's own keys and values and returns the first step's (B, K, T, E)."""

    def __init__(self, source: KVCache) -> None:
        super().__init__()
        self.source = source

    def update(self, k: torch.Tensor, v: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        return self.source.k, self.source.v


@dataclasses.dataclass
class MoRCache:
    """Decoding state: the unique layers' KV caches (None with cycle sharing), the recursion steps'
    (one per step, or only the first with recursive KV sharing), and how many tokens they hold."""

    first: Optional[KVCache]
    last: Optional[KVCache]
    steps: List[RecursionCache]
    seen: int = 0


@dataclasses.dataclass
class RecursionOutput:
    """hidden (B, L, D); depth (B, L) int64: recursion steps each token took (0 on padding);
    stats: RouterStats with one "expert" per step (tokens_per_expert: tokens that took step r;
    fraction_routed_to[n]: fraction of the tokens that took n steps)."""

    hidden: torch.Tensor
    depth: torch.Tensor
    stats: RouterStats


def build_layer(config: TransformerConfig, name: str) -> TransformerBlock:
    return TransformerBlock(config, SwiGLU(config.d_model, config.ffn_dim), name=name)


class Recursion(nn.Module):
    """The shared block (`recursion_layers` TransformerBlocks) and its router: up to N_r steps per token."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        layer_config = config.layer_config()
        self.layers = nn.ModuleList(build_layer(layer_config, f"recursion.layers.{i}")
                                    for i in range(config.recursion_layers))
        self.num_recursions, self.expert_choice = config.num_recursions, config.router == "expert-choice"
        self.shared_kv = config.kv_strategy == "recursive-sharing"
        if self.expert_choice:
            self.router = RecursionExpertChoiceRouter(
                config.d_model, config.capacities, alpha=config.alpha, causal_router=config.causal_router,
                aux_loss_coef=config.aux_loss_coef, z_loss_coef=config.router_z_loss_coef,
                init_std=config.initializer_range)
        else:
            self.router = RecursionTokenChoiceRouter(
                config.d_model, config.num_recursions, alpha=config.alpha, balance_loss_coef=config.balance_loss_coef,
                z_loss_coef=config.router_z_loss_coef, init_std=config.initializer_range)

    def empty_cache(self) -> List[RecursionCache]:
        steps = 1 if self.shared_kv else self.num_recursions
        return [RecursionCache([KVCache() for _ in self.layers]) for _ in range(steps)]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, token_mask: Optional[torch.Tensor],
                caches: Optional[List[RecursionCache]], ctx: RoutingContext) -> RecursionOutput:
        """x: (B, L, D) the recursion's input; positions: (L,) absolute positions; token_mask: (B, L) bool,
        False on padding (None: every token is real); caches: the steps' caches, extended in place;
        ctx: causal or training-time routing, collects the routers' auxiliary losses."""
        B, L, D = x.shape
        N = B * L
        real = torch.ones(B, L, dtype=torch.bool, device=x.device) if token_mask is None else token_mask
        if self.shared_kv and caches is None:
            caches = self.empty_cache()  # the first step's keys and values, for this forward only
        h, candidates = x.reshape(N, D), real
        depth = torch.zeros(B, L, dtype=torch.long, device=x.device)
        if not self.expert_choice:
            target, gates = self.route_depths(h, real, ctx)
            out = h
        for step in range(self.num_recursions):
            if self.expert_choice:
                selection = self.router(h.view(B, L, D), candidates, step, real.sum(1), ctx)
                active, gates = selection.selected, selection.gates
            else:
                active = target > step
            packed = ActiveTokens.from_mask(active)
            if packed.width == 0:
                break  # no token goes on (the steps are nested)
            depth = depth + active.long()
            index, valid = packed.flat_index, packed.valid.reshape(-1)
            xs = gather_rows(h, index).view(B, packed.width, D)
            ys = self.run_block(xs, positions[packed.time(L)], packed.valid, caches, step)
            ys = ys.reshape(-1, D).to(h.dtype)
            gate = gates.reshape(-1)[index]  # (B * K,) float32
            if self.expert_choice:
                h = h + scatter_rows(ys, index, N, weight=gate * valid)
            else:
                leaving = valid & (target.reshape(-1)[index] == step + 1)
                out = out + scatter_rows(ys, index, N, weight=gate * leaving)
                h = scatter_rows(ys, index, N, weight=(valid & ~leaving).float())  # rows of tokens going on
            candidates = active
        hidden = (h if self.expert_choice else out).view(B, L, D)
        return RecursionOutput(hidden=hidden, depth=depth, stats=self.stats(depth, real))

    def route_depths(self, h: torch.Tensor, real: torch.Tensor, ctx: RoutingContext) -> "tuple[torch.Tensor, torch.Tensor]":
        """Token choice on the real tokens of h (B * L, D): target depth (B, L) int64 (0 on padding) and
        gates (B, L) float32."""
        B, L = real.shape
        rows = real.reshape(-1).nonzero()[:, 0]
        routing = self.router(h if rows.numel() == h.shape[0] else gather_rows(h, rows), ctx)
        target = torch.zeros(B * L, dtype=torch.long, device=h.device)
        target[rows] = routing.depth
        gates = scatter_rows(routing.gates[:, None], rows, B * L)[:, 0]
        return target.view(B, L), gates.view(B, L)

    def run_block(self, xs: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                  caches: Optional[List[RecursionCache]], step: int) -> torch.Tensor:
        """The shared layers on one step's packed tokens xs: (B, K, D) at positions (B, K); valid: (B, K)
        False on padding. Returns (B, K, D)."""
        B, K, _ = xs.shape
        if self.shared_kv and step > 0:
            first = caches[0]  # every earlier token's keys and values of the first step
            mask = first.valid[:, None, :] & (first.positions[:, None, :] <= positions[:, :, None])  # (B, K, T)
            layer_caches = [SharedKV(c) for c in first.layers]
        else:
            cache = None if caches is None else caches[step]
            keys = valid
            if cache is not None:
                cache.extend(valid, positions)
                keys = cache.valid
            mask = None if bool(keys.all()) else keys[:, None, :].expand(B, K, keys.shape[1])
            layer_caches = [None] * len(self.layers) if cache is None else cache.layers
        if mask is not None:
            mask = mask | ~valid[:, :, None]  # padding queries see every key (no empty softmax row; dropped)
        for layer, layer_cache in zip(self.layers, layer_caches):
            xs = layer.process(xs, None, None, positions, cache=layer_cache, attn_mask=mask)
        return xs

    def stats(self, depth: torch.Tensor, real: torch.Tensor) -> RouterStats:
        steps = torch.arange(self.num_recursions, device=depth.device)[:, None, None]
        tokens_per_step = (depth[None] > steps).sum((1, 2))
        histogram = torch.bincount(depth[real], minlength=self.num_recursions + 1)
        return RouterStats(tokens_per_expert=tokens_per_step,
                           fraction_routed_to=histogram.float() / max(int(real.sum()), 1))


class MoRLM(PreTrainedModel):
    """Mixture-of-Recursions decoder-only LM (one vocabulary, per-token modality for the loss).

    Example::

        >>> config = MoRConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
        ...                    num_recursions=3, recursion_layers=2)
        >>> model = MoRLM(config)
        >>> ids = torch.randint(0, 64, (2, 12))
        >>> out = model(ids, labels=ids)        # training-time routing: out.loss + out.aux_loss
        >>> out.router_stats["recursion.depth"]  # (2, 12) recursion steps of every token
        >>> model.generate(ids, torch.zeros_like(ids), max_new_tokens=4)   # causal routing, KV caches
    """

    config_class = MoRConfig

    def __init__(self, config: MoRConfig) -> None:
        super().__init__(config)
        layer_config = config.layer_config()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        unique = config.num_unique_layers > 0
        self.first = build_layer(layer_config, "first") if unique else None
        self.recursion = Recursion(config)
        self.last = build_layer(layer_config, "last") if unique else None
        self.norm_f = ModalityRMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def blocks(self) -> List[TransformerBlock]:
        """The distinct layers: first, the shared block's, last."""
        unique = [] if self.first is None else [self.first, self.last]
        return unique[:1] + list(self.recursion.layers) + unique[1:]

    def reset_parameters(self) -> None:
        """Embedding and LM head N(0, initializer_range); output projections of the residual branches
        (attention wo, FFN w2) scaled by 1/sqrt(2 num_layers), num_layers counting every application of
        a shared layer (GPT-2's rule for the depth a token goes through). The routers initialise
        themselves (N(0, initializer_range))."""
        std = self.config.initializer_range
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=std)
            nn.init.normal_(self.lm_head.weight, std=std)
            for block in self.blocks():
                for weight in (block.attn.wo.weight, block.ffn.w2.weight):
                    weight.div_((2 * self.config.num_layers) ** 0.5)

    def empty_cache(self) -> MoRCache:
        unique = self.first is not None
        return MoRCache(first=KVCache() if unique else None, last=KVCache() if unique else None,
                        steps=self.recursion.empty_cache())

    def forward(
        self,
        input_ids: torch.Tensor,
        modality_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cache: Optional[MoRCache] = None,
        return_cache: bool = False,
        causal_routing: bool = False,
    ) -> ModelOutput:
        """input_ids, modality_ids, labels: (B, L) (labels shifted inside). seq_idx: (B, L) document ids of
        packed rows. cache: continue from it (extended in place); return_cache: return the cache after the
        last token. causal_routing: decide every token on its own (always so with a cache).

        Returns a ModelOutput with aux_loss (the routers' weighted losses) and router_stats
        {"recursion": RouterStats, "recursion.depth": (B, L) recursion steps of every token}."""
        modality_ids = check_inputs(input_ids, modality_ids, labels)
        modality_routing(modality_ids, self.config.num_modalities, split=False)  # range check
        if seq_idx is not None:
            if cache is not None or return_cache:
                raise ValueError("momoe: seq_idx (packed documents) cannot be combined with a decoding cache")
            return self.forward_documents(input_ids, modality_ids, labels, seq_idx, causal_routing=causal_routing)
        return self.run(input_ids, modality_ids, labels, cache=cache, return_cache=return_cache,
                        causal_routing=causal_routing)

    def forward_documents(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, labels: Optional[torch.Tensor],
                          seq_idx: torch.Tensor, causal_routing: bool = False) -> ModelOutput:
        """PreTrainedModel.forward_documents (every document a row of its own), and the rows' padding kept
        out of the routing: a document's capacity counts its own tokens only."""
        docs = Documents.from_seq_idx(seq_idx)
        out = self.run(docs.unpack(input_ids), docs.unpack(modality_ids),
                       None if labels is None else docs.unpack(labels, pad=IGNORE_INDEX),
                       token_mask=docs.valid, causal_routing=causal_routing)
        out.logits = docs.repack(out.logits)
        out.router_stats["recursion.depth"] = docs.repack(out.router_stats["recursion.depth"])
        return out

    def run(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, labels: Optional[torch.Tensor],
            token_mask: Optional[torch.Tensor] = None, cache: Optional[MoRCache] = None, return_cache: bool = False,
            causal_routing: bool = False) -> ModelOutput:
        """The forward on checked inputs; token_mask: (B, L) bool, False on padding (packed documents)."""
        if cache is None and return_cache:
            cache = self.empty_cache()
        ctx = RoutingContext(causal=causal_routing or cache is not None)
        start = 0 if cache is None else cache.seen
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids)
        if self.first is not None:
            x = self.first(x, None, None, positions, cache=None if cache is None else cache.first)
        rec = self.recursion(x, positions, token_mask, None if cache is None else cache.steps, ctx)
        x = rec.hidden
        if self.last is not None:
            x = self.last(x, None, None, positions, cache=None if cache is None else cache.last)
        logits = self.lm_head(self.norm_f(x))
        return self.lm_output(logits, modality_ids, labels, ctx.total_aux_loss(logits),
                              {"recursion": rec.stats, "recursion.depth": rec.depth}, cache,
                              new_tokens=input_ids.shape[1], return_cache=return_cache)
