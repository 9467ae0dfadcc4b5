"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

The rate of an update is a pure function of its index, so the scheduler's state is its settings
(JSON) and the step the trainer already stores.
"""
import dataclasses
import math
from typing import Any, Dict, Mapping

import torch


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """lr(step) for updates step = 0 .. total - 1.

    Warmup: lr * (step + 1) / warmup for step < warmup (the first update already moves). Then
    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2 with p = (step - warmup) / (total - warmup - 1), so
    the first update after warmup uses lr and the last one min_lr = min_lr_ratio * lr.

    Example:
        >>> s = WarmupCosine(lr=1e-3, warmup=10, total=100, min_lr_ratio=0.1)
        >>> s(0), s(9), s(10), s(99)
        (0.0001, 0.001, 0.001, 0.0001)
    """

    lr: float
    warmup: int
    total: int
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.total < 1 or not 0 <= self.warmup <= self.total or self.lr <= 0:
            raise ValueError(f"momoe: a schedule needs total >= 1, 0 <= warmup <= total and lr > 0, got "
                             f"total={self.total}, warmup={self.warmup}, lr={self.lr}")

    def __call__(self, step: int) -> float:
        if not 0 <= step < self.total:
            raise ValueError(f"momoe: step {step} is outside the schedule's {self.total} updates")
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        min_lr = self.lr * self.min_lr_ratio
        decay_steps = self.total - self.warmup - 1
        progress = (step - self.warmup) / decay_steps if decay_steps > 0 else 0.0
        return min_lr + (self.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's lr to lr(step); returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WarmupCosine":
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"momoe: malformed schedule state {dict(data)} ({error})") from None
