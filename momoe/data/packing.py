"""Packing documents into fixed-length rows, and a loader that resumes exactly and shards by rank.

Each epoch puts the documents in a seeded order (`numpy.random.default_rng([seed, epoch])`, or
file order without shuffling), concatenates them into one stream and cuts it into rows of
`seq_len` tokens; a document that does not fit runs on into the next row. Rows are dealt out in
global batches of `batch_size * world_size` rows: global batch g holds rows
[g*B*W, (g+1)*B*W), and rank r reads its B rows starting at g*B*W + r*B, so ranks never share a row.

Within a row, `seq_idx` numbers the document pieces from 0 (what the models take for packed
documents: nothing crosses a change of seq_idx). `labels` equal `input_ids` except IGNORE_INDEX at
the first token of each piece (a document's <bos>, or the continuation of a document from the row
before: neither has context inside its row) and on padding; the targets are therefore the same
whether a model uses seq_idx or not, and no target is predicted across documents.

Shape legend: B rows per batch (per rank), L tokens per row.
"""
import dataclasses
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from momoe.data.format import TokenDataset
from momoe.models.modeling_utils import IGNORE_INDEX

PAD_MODALITY = 0  # padding is an <eos> (a text token: text is modality 0 in every vocabulary)


@dataclasses.dataclass
class Batch:
    """input_ids, modality_ids, labels (int64) and seq_idx (int32), each `[B, L]`; call the models as
    `model(b.input_ids, b.modality_ids, labels=b.labels, seq_idx=b.seq_idx)`."""

    input_ids: torch.Tensor
    modality_ids: torch.Tensor
    labels: torch.Tensor
    seq_idx: torch.Tensor

    def to(self, device: "torch.device | str") -> "Batch":
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))

    @property
    def num_targets(self) -> int:
        """Tokens that are a target (labels != IGNORE_INDEX) in the models' shifted loss."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


class PackedRows:
    """One epoch's stream: `dataset`'s documents in `order`, concatenated and cut into rows of seq_len."""

    def __init__(self, dataset: TokenDataset, order: np.ndarray, seq_len: int) -> None:
        self.dataset = dataset
        self.order = order
        self.seq_len = seq_len
        lengths = dataset.lengths[order]
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths
        self.total = int(self.ends[-1])

    def row(self, r: int) -> Tuple[np.ndarray, ...]:
        """Row r as (input_ids, modality_ids, labels, seq_idx), each `[L]`; rows past the stream are padding."""
        L, ds = self.seq_len, self.dataset
        ids = np.full(L, ds.vocab.eos, dtype=np.int64)
        mods = np.full(L, PAD_MODALITY, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        seq_idx = np.zeros(L, dtype=np.int32)
        start = r * L
        stop = min(start + L, self.total)
        k = int(np.searchsorted(self.ends, start, side="right"))
        pos, piece = start, 0
        while pos < stop:
            first = int(ds.offsets[self.order[k]]) + pos - int(self.starts[k])  # file position of this piece
            n = min(int(self.ends[k]), stop) - pos
            t = pos - start
            ids[t:t + n] = ds.tokens[first:first + n]
            mods[t:t + n] = ds.modalities[first:first + n]
            labels[t + 1:t + n] = ids[t + 1:t + n]
            seq_idx[t:t + n] = piece
            pos, k, piece = pos + n, k + 1, piece + 1
        seq_idx[pos - start:] = piece  # padding is a document of its own
        return ids, mods, labels, seq_idx


class PackedLoader:
    """Batches of packed rows, deterministic given (seed, epoch), resumable from `state_dict()`.

    Args:
        dataset (TokenDataset): the documents.
        batch_size (int): rows per batch on this rank (B); seq_len (int): tokens per row (L).
        seed (int), shuffle (bool): document order per epoch (file order when shuffle is False).
        drop_last (bool): drop the last partial row and the last partial global batch (training);
            with False they are padded (evaluation covers every token).
        rank (int), world_size (int): this process's share (disjoint rows per rank, same number of
            batches on every rank).

    `next_batch()` returns the batch at the current position and advances it, rolling over into the
    next epoch; iterating the loader yields the rest of the current epoch.

    Example:
        >>> loader = PackedLoader(load_builtin("train"), batch_size=8, seq_len=256, seed=0)
        >>> batch = loader.next_batch()            # Batch of (8, 256) tensors
        >>> state = loader.state_dict()            # {"epoch": 0, "batch": 1, ...}: save it with the checkpoint
        >>> loader.load_state_dict(state)          # later: continues with the same next batch
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"momoe: batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"momoe: rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.batch = 0
        self._rows: Optional[Tuple[int, PackedRows]] = None
        if len(self) == 0:
            raise ValueError(f"momoe: {dataset.num_tokens} tokens are too few for one batch of {world_size} x "
                             f"{batch_size} rows of {seq_len} tokens (with drop_last)")

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        def count(n: int, size: int) -> int:  # full groups, plus a partial one unless drop_last
            return n // size if self.drop_last else -(-n // size)

        return count(count(self.dataset.num_tokens, self.seq_len), self.batch_size * self.world_size)

    def order(self, epoch: int) -> np.ndarray:
        """The document order of an epoch `[N]`."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def rows(self, epoch: int) -> PackedRows:
        if self._rows is None or self._rows[0] != epoch:
            self._rows = (epoch, PackedRows(self.dataset, self.order(epoch), self.seq_len))
        return self._rows[1]

    def batch_at(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch` for this rank (does not move the position)."""
        if not 0 <= index < len(self):
            raise ValueError(f"momoe: batch {index} out of range: an epoch has {len(self)} batches")
        rows = self.rows(epoch)
        first = (index * self.world_size + self.rank) * self.batch_size
        columns = zip(*(rows.row(r) for r in range(first, first + self.batch_size)))
        return Batch(*(torch.from_numpy(np.stack(c)) for c in columns))

    def next_batch(self) -> Batch:
        batch = self.batch_at(self.epoch, self.batch)
        self.batch += 1
        if self.batch == len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    # ------------------------------------------------------------------ position
    def _settings(self) -> Dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size, "num_documents": len(self.dataset),
                "num_tokens": self.dataset.num_tokens}

    def state_dict(self) -> Dict[str, Any]:
        """The position (epoch, next batch) and the settings it is valid for; JSON-serialisable."""
        return {"epoch": self.epoch, "batch": self.batch, **self._settings()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a state_dict(); a state saved with other settings or data raises ValueError."""
        differences = {k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v}
        if differences:
            raise ValueError("momoe: the loader state was saved with other settings (saved, now): " +
                             ", ".join(f"{k}={saved!r}, {now!r}" for k, (saved, now) in differences.items()))
        epoch, batch = state.get("epoch"), state.get("batch")
        if not isinstance(epoch, int) or not isinstance(batch, int) or epoch < 0 or not 0 <= batch < len(self):
            raise ValueError(f"momoe: invalid loader position epoch={epoch!r}, batch={batch!r} "
                             f"({len(self)} batches per epoch)")
        self.epoch, self.batch = epoch, batch
