"""Mamba language model (dense or Mixture-of-Mamba): embedding, pre-norm residual Mamba blocks,
final RMSNorm, LM head (optionally tied).

Shape legend: B batch, L time, D d_model, V vocabulary.
"""
import dataclasses
import math
from typing import List, Optional

import torch
from torch import nn

from momoe.layers.mamba import MambaMixer, MambaState
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.norms import RMSNorm
from momoe.models.mamba.configuration_mamba import MambaConfig
from momoe.models.modeling_utils import ModelOutput, PreTrainedModel, check_inputs, modality_routing


@dataclasses.dataclass
class MambaCache:
    """Decoding state of every layer, and how many tokens it has seen."""

    layers: List[MambaState]
    seen: int = 0


class MambaBlock(nn.Module):
    """x + mixer(norm(x))."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MambaMixer(
            config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
            dt_rank=config.dt_rank, num_modalities=config.num_modalities, split=config.split,
            split_ssm=config.split_ssm, conv_bias=config.conv_bias, bias=config.bias,
        )

    def forward(self, x, modality_ids, routing, state=None, return_state=False):
        y, new_state = self.mixer(self.norm(x), modality_ids, routing, state=state, return_state=return_state)
        return x + y, new_state

    def step(self, x, modality_ids, state, routing):
        return x + self.mixer.step(self.norm(x), modality_ids, state, routing)


class MambaLM(PreTrainedModel):
    """Mamba LM over interleaved text/image/speech tokens (one vocabulary, per-token modality ids)."""

    config_class = MambaConfig

    def __init__(self, config: MambaConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        """mamba-ssm's scheme: embedding N(0, initializer_range), zero linear biases, out_proj scaled
        by 1/sqrt(n_layer) (GPT-2's rescaling of the residual branches)."""
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=self.config.initializer_range)
            for layer in self.layers:
                mixer = layer.mixer
                for proj in (mixer.in_proj, mixer.out_proj):
                    if proj.bias is not None:
                        proj.bias.zero_()
                mixer.out_proj.weight.div_(math.sqrt(self.config.n_layer))
            if not self.config.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=self.config.initializer_range)

    # ------------------------------------------------------------------ forward
    def _routing(self, modality_ids: torch.Tensor) -> Optional[ModalityRouting]:
        return modality_routing(modality_ids, self.config.num_modalities, self.config.is_mixture)

    def forward(
        self,
        input_ids: torch.Tensor,
        modality_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cache: Optional[MambaCache] = None,
        return_cache: bool = False,
    ) -> ModelOutput:
        """input_ids, modality_ids, labels: (B, L) (modality_ids default to 0; labels are shifted inside,
        IGNORE_INDEX skipped). seq_idx: (B, L) document ids of packed rows (no state crosses documents).
        cache / return_cache: continue from a cache (chunked prefill) and return the one after the last
        token. Returns logits (B, L, V), loss and loss_per_modality when labels are given."""
        modality_ids = check_inputs(input_ids, modality_ids, labels)
        if seq_idx is not None:
            if cache is not None or return_cache:
                raise ValueError("momoe: seq_idx (packed documents) cannot be combined with a decoding cache")
            return self.forward_documents(input_ids, modality_ids, labels, seq_idx)
        routing = self._routing(modality_ids)
        x = self.embedding(input_ids)
        states = []
        for i, layer in enumerate(self.layers):
            state = None if cache is None else cache.layers[i]
            x, new_state = layer(x, modality_ids, routing, state=state, return_state=return_cache)
            states.append(new_state)
        logits = self.lm_head(self.norm_f(x))
        new_cache = MambaCache(states, seen=0 if cache is None else cache.seen) if return_cache else None
        return self.lm_output(logits, modality_ids, labels, logits.new_zeros(()), cache=new_cache,
                              new_tokens=input_ids.shape[1], return_cache=return_cache)

    # ------------------------------------------------------------------ decoding
    def empty_cache(self, batch: int) -> MambaCache:
        p = self.embedding.weight
        return MambaCache([layer.mixer.empty_state(batch, p.dtype, p.device) for layer in self.layers])

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One token per sequence: input_ids, modality_ids (B,) -> logits (B, V); cache updated in place."""
        routing = self._routing(modality_ids)
        x = self.embedding(input_ids)
        for layer, state in zip(self.layers, cache.layers):
            x = layer.step(x, modality_ids, state, routing)
        cache.seen += 1
        return self.lm_head(self.norm_f(x))
