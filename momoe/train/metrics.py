"""Per-modality loss bookkeeping over several batches (token-weighted means, perplexities).

Shape legend: B rows, L tokens per row, M modalities.
"""
import math
from typing import Dict, Sequence

import torch

from momoe.data import Batch
from momoe.models.modeling_utils import IGNORE_INDEX, ModelOutput
from momoe.train.parallel import sum_over_ranks


def targets_per_modality(batch: Batch, num_modalities: int) -> torch.Tensor:
    """`[M]` int64: the targets of each modality in the models' shifted loss (position t predicts
    labels[:, t + 1], whose modality is modality_ids[:, t + 1])."""
    valid = batch.labels[:, 1:] != IGNORE_INDEX
    return torch.bincount(batch.modality_ids[:, 1:][valid], minlength=num_modalities).cpu()


class LossTally:
    """Sums per-modality mean losses weighted by their target counts, across batches.

    Example:
        >>> tally = LossTally(["text", "image"])
        >>> tally.add(out, batch)                 # out = model(..., labels=batch.labels)
        >>> tally.loss(), tally.per_modality()    # means over every target seen
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.sums = [0.0] * len(self.names)
        self.counts = [0] * len(self.names)

    def add(self, out: ModelOutput, batch: Batch) -> None:
        counts = targets_per_modality(batch, len(self.names)).tolist()
        for m, name in enumerate(self.names):
            if counts[m]:
                self.sums[m] += out.loss_per_modality[name].item() * counts[m]
                self.counts[m] += counts[m]

    def all_reduce(self) -> None:
        """Sum the tallies of every rank into each rank's (a collective; nothing to do on one process)."""
        total = sum_over_ranks(self.sums + self.counts)
        self.sums = total[:len(self.names)]
        self.counts = [round(c) for c in total[len(self.names):]]

    @property
    def num_targets(self) -> int:
        return sum(self.counts)

    def loss(self) -> float:
        return sum(self.sums) / max(1, self.num_targets)

    def per_modality(self) -> Dict[str, float]:
        """Mean loss of each modality that had targets."""
        return {name: s / c for name, s, c in zip(self.names, self.sums, self.counts) if c}

    def tokens(self) -> Dict[str, int]:
        return dict(zip(self.names, self.counts))


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    return math.exp(loss) if loss < 700 else float("inf")
