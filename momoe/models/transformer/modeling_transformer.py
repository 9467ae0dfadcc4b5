"""Early-fusion decoder-only transformer: dense (Chameleon-style) or Mixture-of-Transformers.

Mixture-of-Transformers (Liang et al., 2024) gives each modality its own attention projections, FFN
and norms (here the final norm too), and keeps self-attention global over the whole interleaved
sequence; the embedding and the LM head are shared (one token space).

Shape legend: B batch, L time, D d_model, V vocabulary.
"""
import dataclasses
from typing import List, Optional, Union

import torch
from torch import nn

from momoe.layers.attention import Attention, KVCache
from momoe.layers.depth import DepthCache, DepthRouter, MixtureOfDepths
from momoe.layers.ffn import SwiGLU
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.modality_norm import ModalityRMSNorm
from momoe.layers.routers import RoutingContext
from momoe.models.modeling_utils import IGNORE_INDEX, ModelOutput, PreTrainedModel, check_inputs, modality_routing
from momoe.models.packing import document_attention
from momoe.models.transformer.configuration_transformer import TransformerConfig


@dataclasses.dataclass
class TransformerCache:
    """Decoding state of every layer (a KVCache, or a DepthCache for depth-routed layers), and how many
    tokens it holds."""

    layers: List[Union[KVCache, DepthCache]]
    seen: int = 0


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)) (or x + norm(attn(x)), then + norm(ffn(x)) with
    norm_position "post"); per-modality weights when the config splits them.

    `ffn` is built by the model (a SwiGLU here; MoMa passes its modality-aware experts) and called
    through `feed_forward`. With `depth` (a MixtureOfDepths) only the tokens its router selects go
    through the block; the others pass unchanged."""

    def __init__(self, config: TransformerConfig, ffn: nn.Module, name: str,
                 depth: Optional[MixtureOfDepths] = None) -> None:
        super().__init__()
        M = config.num_modalities if config.is_mixture else 1
        self.name = name
        self.attn_norm = ModalityRMSNorm(config.d_model, M, eps=config.norm_eps)
        self.attn = Attention(config.d_model, config.n_heads, config.kv_heads, num_modalities=M,
                              qk_norm=config.qk_norm, rope_theta=config.rope_theta, norm_eps=config.norm_eps)
        self.ffn_norm = ModalityRMSNorm(config.d_model, M, eps=config.norm_eps)
        self.ffn = ffn
        self.depth = depth
        self.post_norm = config.norm_position == "post"

    def empty_cache(self) -> Union[KVCache, DepthCache]:
        return KVCache() if self.depth is None else DepthCache()

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor, routing: Optional[ModalityRouting],
                positions: torch.Tensor, cache: Optional[Union[KVCache, DepthCache]] = None,
                ctx: Optional[RoutingContext] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, D); positions: (L,) or (B, L) positions; cache: extended in place; attn_mask: (B, L, L)
        keys each query may see besides causality (packed documents)."""
        ctx = RoutingContext() if ctx is None else ctx
        if self.depth is None:
            return self.process(x, modality_ids, routing, positions, cache=cache, attn_mask=attn_mask, ctx=ctx)
        return self.depth(self.process, x, modality_ids, routing, positions, cache, ctx, name=self.name,
                          attn_mask=attn_mask)

    def process(self, x: torch.Tensor, modality_ids: torch.Tensor, routing: Optional[ModalityRouting],
                positions: torch.Tensor, cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None,
                ctx: Optional[RoutingContext] = None, ffn_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block on every token of x: (B, L, D); positions: (L,) or (B, L); attn_mask: (B, L, T)
        boolean keys each query may see (with causality); ffn_scale: (B, L) weights of the FFN output
        (depth routing's "ffn" / "symmetric" weighting)."""
        if self.post_norm:  # Swin / Chameleon-34B: x + norm(f(x))
            x = x + self.attn_norm(self.attn(x, routing, positions, cache=cache, attn_mask=attn_mask), modality_ids)
            y = self.ffn_norm(self.feed_forward(x, routing, ctx), modality_ids)
        else:  # pre-norm: x + f(norm(x))
            x = x + self.attn(self.attn_norm(x, modality_ids), routing, positions, cache=cache, attn_mask=attn_mask)
            y = self.feed_forward(self.ffn_norm(x, modality_ids), routing, ctx)
        return x + (y if ffn_scale is None else (ffn_scale[..., None] * y).to(y.dtype))

    def feed_forward(self, h: torch.Tensor, routing: Optional[ModalityRouting],
                     ctx: Optional[RoutingContext]) -> torch.Tensor:
        return self.ffn(h, routing)


class TransformerLM(PreTrainedModel):
    """Decoder-only LM over interleaved text/image/speech tokens (one vocabulary, per-token modality)."""

    config_class = TransformerConfig
    block_class = TransformerBlock

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        shared = self.new_depth_router() if config.mod_shared_router and config.mod_layers else None
        self.layers = nn.ModuleList(self.build_layer(i, shared) for i in range(config.n_layer))
        M = config.num_modalities if config.is_mixture else 1
        self.norm_f = ModalityRMSNorm(config.d_model, M, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @property
    def sorts_by_modality(self) -> bool:
        """Whether the layers need the tokens sorted by modality (some parameters are per modality)."""
        return self.config.is_mixture

    def build_ffn(self, index: int) -> nn.Module:
        M = self.config.num_modalities if self.config.is_mixture else 1
        return SwiGLU(self.config.d_model, self.config.ffn_dim, num_modalities=M)

    def build_layer(self, index: int, shared_router: Optional[DepthRouter] = None) -> TransformerBlock:
        """Layer `index`, depth-routed (MixtureOfDepths) if it is in mod_layers, with `shared_router` if
        given (mod_shared_router), else a router of its own."""
        config, depth = self.config, None
        if index in config.mod_layers:
            routable = None
            if config.mod_modalities is not None:
                routable = [config.modalities.index(m) for m in config.mod_modalities]
            router = self.new_depth_router() if shared_router is None else shared_router
            depth = MixtureOfDepths(router, config.num_modalities, self.sorts_by_modality, routable,
                                    capacity=config.capacity_of(index), weighting=config.mod_weighting)
        return self.block_class(config, self.build_ffn(index), name=f"layers.{index}", depth=depth)

    def new_depth_router(self) -> DepthRouter:
        c = self.config
        return DepthRouter(c.d_model, c.capacity_of(c.mod_layers[0]), gate=c.mod_gate, selection=c.mod_selection)

    def reset_parameters(self) -> None:
        """Embedding and LM head N(0, initializer_range); output projections of the residual branches
        (attention wo, FFN w2) scaled by 1/sqrt(2 n_layer) (GPT-2)."""
        std = self.config.initializer_range
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=std)
            nn.init.normal_(self.lm_head.weight, std=std)
            for block in self.layers:
                for weight in (block.attn.wo.weight, self.ffn_output_weight(block.ffn)):
                    weight.div_((2 * self.config.n_layer) ** 0.5)

    def ffn_output_weight(self, ffn: nn.Module) -> torch.Tensor:
        """The FFN's output projection (scaled down at initialisation)."""
        return ffn.w2.weight

    def empty_cache(self) -> TransformerCache:
        return TransformerCache([layer.empty_cache() for layer in self.layers])

    def forward(
        self,
        input_ids: torch.Tensor,
        modality_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cache: Optional[TransformerCache] = None,
        return_cache: bool = False,
        causal_routing: bool = False,
        train_aux_routers: bool = False,
    ) -> ModelOutput:
        """input_ids, modality_ids, labels: (B, L) (labels shifted inside). seq_idx: (B, L) document ids of
        packed rows (no attention across documents, positions restart). cache: continue from it (it is
        extended in place); return_cache: return the cache after the last token.

        Learned routing (MoMa experts, MoD layers): by default it decides over the whole batch (expert
        choice, per-sequence top-k), which is how the models train but looks at future tokens.
        causal_routing=True, forced whenever a cache is used, decides every token on its own with the
        auxiliary routers. train_aux_routers=True adds the auxiliary routers' BCE against the batch
        decisions to aux_loss (their second training stage)."""
        modality_ids = check_inputs(input_ids, modality_ids, labels)
        attn_mask = None
        if seq_idx is not None:
            if cache is not None or return_cache:
                raise ValueError("momoe: seq_idx (packed documents) cannot be combined with a decoding cache")
            if seq_idx.shape != input_ids.shape:
                raise ValueError(f"momoe: seq_idx {tuple(seq_idx.shape)} must match input_ids {tuple(input_ids.shape)}")
            positions, attn_mask, starts = document_attention(seq_idx)
            if labels is not None:  # a document's last token does not predict the next document's first
                labels = labels.masked_fill(starts, IGNORE_INDEX)
        if cache is None and return_cache:
            cache = self.empty_cache()
        ctx = RoutingContext(causal=causal_routing or cache is not None, train_aux_routers=train_aux_routers)
        routing = modality_routing(modality_ids, self.config.num_modalities, self.sorts_by_modality)
        if seq_idx is None:
            start = 0 if cache is None else cache.seen
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, modality_ids, routing, positions, cache=None if cache is None else cache.layers[i], ctx=ctx,
                      attn_mask=attn_mask)
        logits = self.lm_head(self.norm_f(x, modality_ids))
        return self.lm_output(logits, modality_ids, labels, ctx.total_aux_loss(logits), ctx.stats, cache,
                              new_tokens=input_ids.shape[1], return_cache=return_cache)
