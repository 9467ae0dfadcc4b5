"""The training loop: AdamW with warmup + cosine, gradient accumulation and clipping, optional bf16
autocast, per-modality losses in a progress bar and a JSONL log, exact resumption from checkpoints.

On several processes (`parallel`, momoe.train.parallel) every rank reads its own rows of each global
batch of world_size * batch_size rows, the gradient is the one of the mean loss over the global batch's
targets, the logged losses and tokens/s are global, and rank 0 alone logs, plots and shows progress.

Shape legend: B rows per micro-batch, L tokens per row, M modalities.
"""
import inspect
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from momoe.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_json, load_weights
from momoe.data import PackedLoader, TokenDataset
from momoe.models import config_from_dict
from momoe.models.modeling_utils import PreTrainedModel
from momoe.distributed import gradient_sync, load_distributed
from momoe.train.checkpointing import (CHECKPOINTS_DIR, checkpoint_name, is_distributed_checkpoint, latest_checkpoint,
                                       read_training_state, write_checkpoint)
from momoe.train.config import TrainConfig
from momoe.train.log import LOG_FILE, JsonlLog, read_log
from momoe.train.metrics import LossTally
from momoe.train.optim import STATE_PREFIX, build_optimizer, load_optimizer_state, optimizer_state
from momoe.train.parallel import Parallel, barrier, clip_gradients, sum_over_ranks, write_distributed_checkpoint
from momoe.train.plot import MISSING, log_curves, plot_curves
from momoe.train.rng import rng_state, set_rng_state
from momoe.train.schedule import WarmupCosine

PLOT_FILE = "loss.png"
# Settings a resumed run may change; any other difference would break the continuation.
CHANGEABLE_ON_RESUME = ("steps", "log_interval", "checkpoint_interval", "keep_checkpoints")


class Trainer:
    """Train `model` on packed rows of `dataset`.

    Args:
        model (PreTrainedModel): any momoe model; its vocabulary and modalities must read the data.
        dataset (TokenDataset): training documents (momoe.data.load_dataset).
        config (TrainConfig): the run's settings.
        out_dir (str | None): where log.jsonl, loss.png and checkpoints/ go (None: nothing is written).
        name (str): the run's name in the progress bar and plots; progress (bool): show the bar.
        metadata (dict): JSON stored in every checkpoint (e.g. the dataset source, for `momoe train --resume`).
        parallel (Parallel): the processes to train on (momoe.train.parallel.start_parallel; None: this one);
            the model is wrapped here, config.batch_size is per rank.

    Example:
        >>> trainer = Trainer(model, load_dataset("builtin"), TrainConfig(steps=100), out_dir="runs/x")
        >>> records = trainer.fit()              # one dict per logged step
        >>> Trainer(model, data, TrainConfig(steps=100), out_dir="runs/x").resume()   # after a kill: continue
    """

    def __init__(self, model: PreTrainedModel, dataset: TokenDataset, config: TrainConfig,
                 out_dir: Optional[str] = None, name: str = "train", progress: bool = True,
                 metadata: Optional[Dict[str, Any]] = None, parallel: Optional[Parallel] = None) -> None:
        dataset.vocab.check_model(model.config.vocab_size, model.config.modalities)
        if config.train_aux_routers and "train_aux_routers" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"momoe: train_aux_routers: {type(model).__name__} has no auxiliary routers")
        self.parallel = parallel or Parallel()
        self.module = model  # the plain model (checkpoints, config)
        self.device = next(model.parameters()).device
        self.model = self.parallel.wrap(model)  # what trains: DDP / FSDP2 / expert-parallel, or the model
        self.config = config
        self.out_dir = out_dir
        self.name = name
        self.progress = progress and self.parallel.is_main
        self.metadata = dict(metadata or {})
        self.names = list(model.config.modalities)
        self.loader = PackedLoader(dataset, config.batch_size, config.seq_len, seed=config.seed,
                                   rank=self.parallel.rank, world_size=self.parallel.world_size)
        self.optimizer = build_optimizer(self.model, config)
        self.schedule = WarmupCosine(config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
        self.forward_kwargs = {"train_aux_routers": True} if config.train_aux_routers else {}
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.records: List[Dict[str, Any]] = []
        self.log = JsonlLog(os.path.join(out_dir, LOG_FILE)) if out_dir and self.parallel.is_main else None

    # ------------------------------------------------------------------ one update
    def train_step(self) -> Dict[str, Any]:
        """One optimizer update over grad_accum micro-batches; returns its log record.

        Each micro-batch's mean loss is weighted by its share of the update's targets (over all ranks,
        times world_size, as the ranks' gradients are averaged), so the gradient is the one of a single
        batch holding every row (aux losses are averaged over micro-batches and ranks)."""
        start = time.perf_counter()
        c = self.config
        self.model.train()
        batches = [self.loader.next_batch().to(self.device) for _ in range(c.grad_accum)]
        world_size = self.parallel.world_size
        total_targets = max(1.0, sum_over_ranks([sum(b.num_targets for b in batches)])[0])
        lr = self.schedule.apply(self.optimizer, self.step)
        tally, aux_total = LossTally(self.names), 0.0
        for i, batch in enumerate(batches):
            with gradient_sync(self.model, enabled=i == len(batches) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
                    out = self.model(batch.input_ids, batch.modality_ids, labels=batch.labels,
                                     seq_idx=batch.seq_idx, **self.forward_kwargs)
                aux = out.aux_loss if out.aux_loss is not None else out.loss.new_zeros(())
                (out.loss * (batch.num_targets * world_size / total_targets) + aux / c.grad_accum).backward()
            tally.add(out, batch)
            aux_total += aux.item() / c.grad_accum
        tally.all_reduce()
        aux_total = sum_over_ranks([aux_total])[0] / world_size
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = clip_gradients(self.model, params, c.clip if c.clip > 0 else float("inf"), self.parallel)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = c.rows_per_step * c.seq_len * world_size
        self.step += 1
        self.tokens_seen += tokens
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        return {"step": self.step, "loss": tally.loss(), "loss_per_modality": tally.per_modality(),
                "aux_loss": aux_total, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / seconds,
                "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed}

    # ------------------------------------------------------------------ the loop
    def fit(self, on_step: Optional[Callable[["Trainer", Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
        """Train until config.steps updates; log every log_interval updates, checkpoint every
        checkpoint_interval updates and at the end, then plot the loss curves. on_step(trainer, record)
        runs after every update. Returns the logged records (including those before a resume)."""
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, desc=self.name, unit="step", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        while self.step < c.steps:
            record = self.train_step()
            if self.step % c.log_interval == 0 or self.step == c.steps:
                self.records.append(record)
                if self.log is not None:
                    self.log.append(record)
            bar.set_postfix_str(describe(record), refresh=False)
            bar.update(1)
            interval = c.checkpoint_interval and self.step % c.checkpoint_interval == 0
            if self.out_dir and (self.step == c.steps or interval):
                self.save_checkpoint()
            if on_step is not None:
                on_step(self, record)
        bar.close()
        if self.out_dir and self.parallel.is_main:
            self.plot()
        return self.records

    def plot(self) -> Optional[str]:
        """The per-modality loss curves of this run as out_dir/loss.png (None without matplotlib)."""
        path = plot_curves({self.name: log_curves(self.records)}, os.path.join(self.out_dir, PLOT_FILE),
                           title=f"{self.name}: training loss per modality")
        if path is None and self.progress:
            print(f"momoe: {MISSING}")
        return path

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """Write checkpoint `step` of the run to out_dir (see momoe.train.checkpointing); on several
        processes a collective: rank 0 writes the whole model (DDP), or every rank its shards (FSDP2, EP)."""
        if not self.out_dir:
            raise ValueError("momoe: this trainer has no out_dir to write checkpoints to")
        rng_tensors, rng_meta = rng_state()
        state = {"tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed, "train_config": self.config.to_dict(),
                 "world_size": self.parallel.world_size, "schedule": self.schedule.to_dict(),
                 "loader": self.loader.state_dict(), "rng": rng_meta, "metadata": self.metadata}
        keep = self.config.keep_checkpoints
        if self.parallel.sharded:
            return write_distributed_checkpoint(self.out_dir, self.step, self.model, self.optimizer, state,
                                                rng_tensors, keep=keep)
        if self.parallel.is_main:
            opt_tensors, opt_meta = optimizer_state(self.optimizer)
            write_checkpoint(self.out_dir, self.step, self.module, {**state, "optimizer": opt_meta},
                             {**opt_tensors, **rng_tensors}, keep=keep)
        barrier()
        return os.path.join(self.out_dir, CHECKPOINTS_DIR, checkpoint_name(self.step))

    def resume(self, checkpoint: Optional[str] = None) -> str:
        """Continue from `checkpoint` (default: out_dir's latest): weights, optimizer, data position,
        random generators and step, so the next updates are those of a run that never stopped.
        Returns the checkpoint folder; a checkpoint of another model or other settings raises CheckpointError.
        A distributed checkpoint resumes on any number of processes (global batch unchanged); a
        single-process one on one process or under DDP."""
        path = checkpoint or (latest_checkpoint(self.out_dir) if self.out_dir else None)
        if path is None:
            raise CheckpointError(f"momoe: nothing to resume: {self.out_dir} has no checkpoint")
        state, tensors = read_training_state(path)
        self._check_settings(path, state)
        if is_distributed_checkpoint(path):
            load_distributed(path, self.model, self.optimizer)
        elif self.parallel.sharded:
            raise CheckpointError(f"momoe: {path} is a single-process checkpoint; resume it on one process or "
                                  f"with --parallel ddp")
        else:
            self.module.load_checked_state_dict(load_weights(os.path.join(path, WEIGHTS_NAME)), source=path)
            load_optimizer_state(self.optimizer, {k: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)},
                                 state["optimizer"], path)
        try:
            self.loader.load_state_dict(_rescaled_loader_state(state["loader"], self.loader.batch_size,
                                                               self.parallel.world_size))
        except ValueError as error:
            raise CheckpointError(f"momoe: {path}: {error}") from None
        set_rng_state(tensors, state["rng"], path)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed = float(state["elapsed_s"])
        if self.log is not None:
            self.log.truncate(self.step)
            if os.path.isfile(self.log.path):
                self.records = read_log(self.log.path)
        return path

    def _check_settings(self, path: str, state: Dict[str, Any]) -> None:
        saved_model = config_from_dict({k: v for k, v in load_json(os.path.join(path, CONFIG_NAME)).items()
                                        if k != "momoe_version"}).to_dict()
        now_model = self.module.config.to_dict()
        differ = sorted(k for k in set(saved_model) | set(now_model) if saved_model.get(k) != now_model.get(k))
        if differ:
            raise CheckpointError(f"momoe: {path} holds another model: its config differs in {differ}")
        saved = TrainConfig.from_dict(state["train_config"]).to_dict()
        now = self.config.to_dict()
        # the global batch (batch_size rows on each of world_size ranks) must stay; its split may change
        saved["batch_size"] *= int(state.get("world_size", 1))
        now["batch_size"] *= self.parallel.world_size
        differ = sorted(k for k in saved if saved[k] != now[k] and k not in CHANGEABLE_ON_RESUME)
        if differ:
            raise CheckpointError(f"momoe: {path} was trained with other settings (saved, now): " +
                                  ", ".join(f"{k}={saved[k]!r}, {now[k]!r}" for k in differ))


def resumed_config(state: Dict[str, Any], changes: Dict[str, Any], world_size: int) -> TrainConfig:
    """The settings of a run resumed from its training `state` with `changes` on world_size ranks: without
    a new batch_size, the saved global batch split over the ranks."""
    saved = dict(state["train_config"])
    rows = saved["batch_size"] * int(state.get("world_size", 1))
    if "batch_size" not in changes:
        if rows % world_size:
            raise ValueError(f"momoe: the run's global batch of {rows} rows does not split over {world_size} "
                             f"processes; give --batch-size")
        saved["batch_size"] = rows // world_size
    return TrainConfig.from_dict({**saved, **changes})


def _rescaled_loader_state(state: Dict[str, Any], batch_size: int, world_size: int) -> Dict[str, Any]:
    """A loader position saved with another split of the same global batch (batch_size x world_size
    rows), as this split's (the position counts global batches); other states unchanged."""
    if state.get("batch_size", 0) * state.get("world_size", 1) == batch_size * world_size:
        return {**state, "batch_size": batch_size, "world_size": world_size}
    return state


def describe(record: Dict[str, Any]) -> str:
    """'loss 3.210 | text 2.10 image 4.02 speech 3.91 | 1,234 tok/s' for a progress bar."""
    per = " ".join(f"{name} {loss:.2f}" for name, loss in record["loss_per_modality"].items())
    return f"loss {record['loss']:.3f} | {per} | {record['tokens_per_s']:,.0f} tok/s"
