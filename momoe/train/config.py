"""Training settings: one typed dataclass, stored in every training checkpoint as JSON."""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple


@dataclasses.dataclass
class TrainConfig:
    """What a training run does (the model and the data are given separately).

    steps: optimizer updates; batch_size, seq_len: packed rows per micro-batch and tokens per row;
    grad_accum: micro-batches per update (an update sees grad_accum * batch_size rows).
    lr: peak learning rate, reached after `warmup` updates of linear warmup (None: 10% of steps), then
    a cosine decay to min_lr_ratio * lr at the last update. clip: maximum global gradient norm (0: no
    clipping). bf16: bfloat16 autocast around the forward. seed: the data order (model initialisation
    is the caller's). log_interval: updates between JSONL records; checkpoint_interval: updates between
    checkpoints (0: only at the end); keep_checkpoints: how many recent checkpoints stay on disk.
    train_aux_routers: also train the auxiliary routers of learned routing (MoMa experts, MoD layers)
    on the training-time decisions, so that causal decoding has routers that learned something; their
    inputs are detached, so the rest of the model gets the gradients it would get without them (only
    the clipping norm includes theirs).
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: Optional[int] = None
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    log_interval: int = 1
    checkpoint_interval: int = 0
    keep_checkpoints: int = 2
    train_aux_routers: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"momoe: TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"momoe: warmup must be in [0, steps={self.steps}], got {self.warmup}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"momoe: lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"momoe: betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip < 0 or self.weight_decay < 0 or self.checkpoint_interval < 0:
            raise ValueError("momoe: clip, weight_decay and checkpoint_interval must be >= 0")

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"momoe: unknown TrainConfig keys {unknown}; known keys: {sorted(fields)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
