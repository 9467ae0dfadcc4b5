"""What every momoe model shares: the output object, the causal LM loss per modality, and
save_pretrained / from_pretrained in momoe's own layout (config.json + model.safetensors)."""
import dataclasses
import os
from typing import Any, ClassVar, Dict, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn

from momoe.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_state_dict, load_json, load_weights, save_json, save_weights
from momoe.layers.modality_linear import ModalityRouting
from momoe.models.configuration_utils import ModelConfig

IGNORE_INDEX = -100


@dataclasses.dataclass
class ModelOutput:
    """logits: (B, L, vocab); loss: mean next-token loss over all targets; loss_per_modality: the same
    mean over the targets of each modality present; aux_loss: routers' auxiliary losses (0 without
    learned routing); router_stats: per-layer routing statistics; cache: decoding state, when asked."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    loss_per_modality: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    aux_loss: Optional[torch.Tensor] = None
    router_stats: Dict[str, Any] = dataclasses.field(default_factory=dict)
    cache: Optional[Any] = None


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, modality_ids: torch.Tensor, modality_names: Sequence[str]
) -> "tuple[torch.Tensor, Dict[str, torch.Tensor]]":
    """Next-token cross entropy: position t predicts labels[:, t + 1] (IGNORE_INDEX targets skipped).

    Args:
        logits: `[B, L, V]`; labels, modality_ids: `[B, L]` (the modality of a target is its token's).
    Returns:
        the mean loss over all targets, and the mean over each modality's targets (modalities with
        no target are left out).
    """
    # Shift the labels rather than the logits (a view of the logits, no copy of (B, L, V)); the last
    # position has no target.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    target_modality = F.pad(modality_ids[:, 1:], (0, 1), value=0).reshape(-1)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                                reduction="none")
    valid = targets != IGNORE_INDEX
    loss = per_token.sum() / valid.sum().clamp(min=1)
    per_modality = {}
    for m, name in enumerate(modality_names):
        mask = valid & (target_modality == m)
        count = mask.sum()
        if bool(count > 0):
            per_modality[name] = (per_token * mask).sum() / count
    return loss, per_modality


def modality_routing(modality_ids: torch.Tensor, num_modalities: int, split: bool) -> Optional[ModalityRouting]:
    """The tokens sorted by modality when some parameters are per modality (`split`), else None;
    modality ids are range-checked either way."""
    if modality_ids.numel() and bool(((modality_ids < 0) | (modality_ids >= num_modalities)).any()):
        raise ValueError(f"momoe: modality_ids must be in [0, {num_modalities}), got values in "
                         f"[{int(modality_ids.min())}, {int(modality_ids.max())}]")
    return ModalityRouting.from_ids(modality_ids, num_modalities) if split else None


def check_inputs(input_ids: torch.Tensor, modality_ids: Optional[torch.Tensor],
                 labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Shapes of a forward's inputs; returns modality_ids (zeros, all text, when None)."""
    if input_ids.dim() != 2:
        raise ValueError(f"momoe: input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    if modality_ids is None:
        modality_ids = torch.zeros_like(input_ids)
    if modality_ids.shape != input_ids.shape:
        raise ValueError(f"momoe: modality_ids {tuple(modality_ids.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"momoe: labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    return modality_ids


class PreTrainedModel(nn.Module):
    """Base of every momoe model: holds `config`, saves and loads momoe checkpoints."""

    config_class: ClassVar[Type[ModelConfig]]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"momoe: {type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def save_pretrained(self, path: str) -> None:
        """Write `path/config.json` and `path/model.safetensors` (each atomically)."""
        from momoe import __version__

        aliases = self.tied_aliases()
        state = {name: t for name, t in self.state_dict().items() if name not in aliases}
        save_weights(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt", "momoe_version": __version__})
        save_json({**self.config.to_dict(), "momoe_version": __version__}, os.path.join(path, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu") -> "PreTrainedModel":
        """Load a momoe checkpoint written by save_pretrained; mismatches raise CheckpointError."""
        data = load_json(os.path.join(path, CONFIG_NAME))
        data.pop("momoe_version", None)
        model = cls(cls.config_class.from_dict(data))
        state = load_weights(os.path.join(path, WEIGHTS_NAME))
        model.load_checked_state_dict(state, source=path)
        return model.to(map_location)

    def tied_aliases(self) -> Dict[str, str]:
        """{name: earlier name} for state-dict entries sharing storage with an earlier one (tied
        weights): saved once, under the earlier name."""
        first: Dict[int, str] = {}
        aliases = {}
        for name, t in self.state_dict().items():
            key = t.untyped_storage().data_ptr()
            if key in first and t.numel() > 0:
                aliases[name] = first[key]
            else:
                first.setdefault(key, name)
        return aliases

    def load_checked_state_dict(self, state: Dict[str, torch.Tensor], source: str) -> None:
        """load_state_dict after check_state_dict (clear errors); tied entries may be absent."""
        state = dict(state)
        for alias, name in self.tied_aliases().items():
            if alias not in state and name in state:
                state[alias] = state[name]
        check_state_dict(self, state, source)
        self.load_state_dict(state, strict=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ shared by the families
    def lm_output(self, logits: torch.Tensor, modality_ids: torch.Tensor, labels: Optional[torch.Tensor],
                  aux_loss: torch.Tensor, router_stats: Optional[Dict[str, Any]] = None, cache: Optional[Any] = None,
                  new_tokens: int = 0, return_cache: bool = False) -> ModelOutput:
        """The ModelOutput of a forward: logits (B, L, V), the per-modality loss when labels are given; a
        cache that took part is advanced by new_tokens (its `seen`) and returned when asked."""
        out = ModelOutput(logits=logits, aux_loss=aux_loss, router_stats=router_stats or {})
        if labels is not None:
            out.loss, out.loss_per_modality = causal_lm_loss(logits, labels, modality_ids, self.config.modalities)
        if cache is not None:
            cache.seen += new_tokens
            if return_cache:
                out.cache = cache
        return out

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """One token per sequence: input_ids, modality_ids (B,) -> logits (B, V); cache extended in place."""
        return self.forward(input_ids[:, None], modality_ids[:, None], cache=cache).logits[:, 0]

    def forward_documents(
        self, input_ids: torch.Tensor, modality_ids: torch.Tensor, labels: Optional[torch.Tensor], seq_idx: torch.Tensor,
        **forward_kwargs: Any,
    ) -> ModelOutput:
        """Packed rows (B, L) with document ids seq_idx: every document runs as a row of its own, so no
        state, attention or position crosses a document boundary; logits come back packed.
        forward_kwargs go to the forward (e.g. causal_routing). Batch-level routing decisions (expert
        choice, MoD top-k) see the documents' padding as tokens; causal routing does not depend on it."""
        from momoe.models.packing import Documents

        docs = Documents.from_seq_idx(seq_idx)
        out = self(docs.unpack(input_ids), docs.unpack(modality_ids),
                   None if labels is None else docs.unpack(labels, pad=IGNORE_INDEX), **forward_kwargs)
        out.logits = docs.repack(out.logits)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        modality_ids: torch.Tensor,
        max_new_tokens: int,
        new_modality: int = 0,
        temperature: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Continue (B, L) prompts by max_new_tokens tokens of modality `new_modality`: a prefill that
        returns the decoding cache, then one step() per token; greedy when temperature is 0.
        Returns (B, L + max_new_tokens)."""
        out = self(input_ids, modality_ids, return_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        tokens = [input_ids]
        mod = torch.full((input_ids.shape[0],), new_modality, dtype=modality_ids.dtype, device=input_ids.device)
        for i in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            tokens.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt, mod, cache)
        return torch.cat(tokens, dim=1)
