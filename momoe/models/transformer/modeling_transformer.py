"""Early-fusion decoder-only transformer: dense (Chameleon-style) or Mixture-of-Transformers.

Mixture-of-Transformers (Liang et al., 2024) gives each modality its own attention projections, FFN
and norms (here the final norm too), and keeps self-attention global over the whole interleaved
sequence; the embedding and the LM head are shared (one token space).

Shape legend: B batch, L time, D d_model, V vocabulary.
"""
import dataclasses
from typing import List, Optional

import torch
from torch import nn

from momoe.layers.attention import Attention, KVCache
from momoe.layers.ffn import SwiGLU
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.modality_norm import ModalityRMSNorm
from momoe.models.modeling_utils import ModelOutput, PreTrainedModel, causal_lm_loss, check_inputs, modality_routing
from momoe.models.transformer.configuration_transformer import TransformerConfig


@dataclasses.dataclass
class TransformerCache:
    """Keys and values of every layer, and how many tokens they hold."""

    layers: List[KVCache]
    seen: int = 0


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)); per-modality weights when the config splits them."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        M = config.num_modalities if config.is_mixture else 1
        self.attn_norm = ModalityRMSNorm(config.d_model, M, eps=config.norm_eps)
        self.attn = Attention(config.d_model, config.n_heads, config.kv_heads, num_modalities=M,
                              qk_norm=config.qk_norm, rope_theta=config.rope_theta, norm_eps=config.norm_eps)
        self.ffn_norm = ModalityRMSNorm(config.d_model, M, eps=config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_dim, num_modalities=M)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor, routing: Optional[ModalityRouting],
                positions: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x: (B, L, D); positions: (L,) absolute positions; cache: extended in place."""
        x = x + self.attn(self.attn_norm(x, modality_ids), routing, positions, cache=cache)
        return x + self.ffn(self.ffn_norm(x, modality_ids), routing)


class TransformerLM(PreTrainedModel):
    """Decoder-only LM over interleaved text/image/speech tokens (one vocabulary, per-token modality)."""

    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        M = config.num_modalities if config.is_mixture else 1
        self.norm_f = ModalityRMSNorm(config.d_model, M, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        """Embedding and LM head N(0, initializer_range); output projections of the residual branches
        (attention wo, FFN w2) scaled by 1/sqrt(2 n_layer) (GPT-2)."""
        std = self.config.initializer_range
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=std)
            nn.init.normal_(self.lm_head.weight, std=std)
            for layer in self.layers:
                for proj in (layer.attn.wo, layer.ffn.w2):
                    proj.weight.div_((2 * self.config.n_layer) ** 0.5)

    def empty_cache(self) -> TransformerCache:
        return TransformerCache([KVCache() for _ in self.layers])

    def forward(
        self,
        input_ids: torch.Tensor,
        modality_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cache: Optional[TransformerCache] = None,
        return_cache: bool = False,
    ) -> ModelOutput:
        """input_ids, modality_ids, labels: (B, L) (labels shifted inside). seq_idx: (B, L) document ids of
        packed rows (no attention across documents, positions restart). cache: continue from it (it is
        extended in place); return_cache: return the cache after the last token."""
        modality_ids = check_inputs(input_ids, modality_ids, labels)
        if seq_idx is not None:
            if cache is not None or return_cache:
                raise ValueError("momoe: seq_idx (packed documents) cannot be combined with a decoding cache")
            return self.forward_documents(input_ids, modality_ids, labels, seq_idx)
        if cache is None and return_cache:
            cache = self.empty_cache()
        routing = modality_routing(modality_ids, self.config.num_modalities, self.config.is_mixture)
        start = 0 if cache is None else cache.seen
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, modality_ids, routing, positions, cache=None if cache is None else cache.layers[i])
        logits = self.lm_head(self.norm_f(x, modality_ids))
        out = ModelOutput(logits=logits, aux_loss=logits.new_zeros(()))
        if labels is not None:
            out.loss, out.loss_per_modality = causal_lm_loss(logits, labels, modality_ids, self.config.modalities)
        if cache is not None:
            cache.seen += input_ids.shape[1]
            if return_cache:
                out.cache = cache
        return out

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, cache: TransformerCache) -> torch.Tensor:
        """One token per sequence: input_ids, modality_ids (B,) -> logits (B, V); cache extended in place."""
        return self.forward(input_ids[:, None], modality_ids[:, None], cache=cache).logits[:, 0]
