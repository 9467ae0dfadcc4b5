"""Evaluation: loss and perplexity per modality of a model on a dataset split.

Shape legend: B rows, L tokens per row.
"""
import dataclasses
import inspect
from typing import Dict, Optional

import torch

from momoe.data import PackedLoader, TokenDataset
from momoe.models.modeling_utils import PreTrainedModel
from momoe.train.metrics import LossTally, perplexity


@dataclasses.dataclass
class EvalResult:
    """Token-weighted mean losses over every target of the evaluated rows."""

    loss: float
    loss_per_modality: Dict[str, float]
    tokens_per_modality: Dict[str, int]

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def perplexity_per_modality(self) -> Dict[str, float]:
        return {name: perplexity(loss) for name, loss in self.loss_per_modality.items()}

    def to_dict(self) -> Dict[str, object]:
        return {"loss": self.loss, "perplexity": self.perplexity, "loss_per_modality": self.loss_per_modality,
                "perplexity_per_modality": self.perplexity_per_modality,
                "tokens_per_modality": self.tokens_per_modality}


@torch.no_grad()
def evaluate(model: PreTrainedModel, dataset: TokenDataset, batch_size: int = 8, seq_len: int = 256,
             max_batches: Optional[int] = None, bf16: bool = False, causal_routing: bool = False) -> EvalResult:
    """Loss per modality over the documents of `dataset` in file order, packed into (B, L) rows (the
    last rows padded, so every token counts unless max_batches stops earlier).

    causal_routing: route MoMa / MoD tokens one by one with the auxiliary routers (as decoding does)
    instead of the training-time expert choice over the batch (models without learned routing ignore it).
    """
    dataset.vocab.check_model(model.config.vocab_size, model.config.modalities)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"momoe: max_batches must be >= 1 or None, got {max_batches}")
    routed = "causal_routing" in inspect.signature(model.forward).parameters
    kwargs = {"causal_routing": True} if causal_routing and routed else {}
    loader = PackedLoader(dataset, batch_size, seq_len, shuffle=False, drop_last=False)
    device = next(model.parameters()).device
    tally = LossTally(model.config.modalities)
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(batch.input_ids, batch.modality_ids, labels=batch.labels, seq_idx=batch.seq_idx, **kwargs)
            tally.add(out, batch)
    finally:
        model.train(was_training)
    return EvalResult(tally.loss(), tally.per_modality(), tally.tokens())
