"""Packing into (B, L) rows: document boundaries in seq_idx, labels, determinism, exact resume, sharding."""
import json

import numpy as np
import pytest
import torch

from momoe.data.packing import PackedLoader
from momoe.models import TransformerConfig, build_model
from momoe.models.modeling_utils import IGNORE_INDEX
from tests.data.helpers import random_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return random_dataset(tmp_path_factory.mktemp("packing"), num_docs=60, seed=3)


def epoch_batches(loader):
    return [loader.batch_at(loader.epoch, i) for i in range(len(loader))]


def batches_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip((a.input_ids, a.modality_ids, a.labels, a.seq_idx),
                                                   (b.input_ids, b.modality_ids, b.labels, b.seq_idx)))


@pytest.mark.parametrize("seq_len", [7, 32])
def test_rows_are_the_document_stream(dataset, seq_len):
    """Without shuffling, the rows cut the concatenated documents; seq_idx changes exactly where a
    document starts (or a row starts), labels are ignored exactly there and on padding."""
    loader = PackedLoader(dataset, batch_size=3, seq_len=seq_len, shuffle=False, drop_last=False)
    batches = epoch_batches(loader)
    ids = torch.cat([b.input_ids for b in batches]).reshape(-1)
    mods = torch.cat([b.modality_ids for b in batches]).reshape(-1)
    labels = torch.cat([b.labels for b in batches]).reshape(-1)
    seq = torch.cat([b.seq_idx for b in batches])
    n = dataset.num_tokens
    assert torch.equal(ids[:n], torch.from_numpy(dataset.tokens.astype(np.int64)))
    assert torch.equal(mods[:n], torch.from_numpy(dataset.modalities.astype(np.int64)))
    assert bool((labels[n:] == IGNORE_INDEX).all()) and bool((ids[n:] == dataset.vocab.eos).all())
    starts = torch.zeros(seq.numel(), dtype=torch.bool)
    starts[torch.tensor(dataset.offsets[:-1])] = True
    if n < seq.numel():
        starts[n] = True  # the padding is a piece of its own
    starts = starts.reshape(seq.shape)
    starts[:, 0] = True
    changes = torch.ones_like(starts)
    changes[:, 1:] = seq[:, 1:] != seq[:, :-1]
    assert torch.equal(changes, starts)
    assert torch.equal(seq, starts.int().cumsum(1) - 1)
    padding = (torch.arange(seq.numel()) >= n).reshape(seq.shape)
    assert torch.equal(labels.reshape(seq.shape) == IGNORE_INDEX, starts | padding)
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])


def test_drop_last_covers_whole_rows_only(dataset):
    loader = PackedLoader(dataset, batch_size=2, seq_len=16, seed=1)
    assert len(loader) == dataset.num_tokens // 16 // 2
    assert all(b.input_ids.shape == (2, 16) for b in loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 0
    with pytest.raises(ValueError, match="too few for one batch"):
        PackedLoader(dataset, batch_size=64, seq_len=256)


def test_shuffling_is_deterministic_by_seed_and_epoch(dataset):
    a = PackedLoader(dataset, batch_size=2, seq_len=16, seed=5)
    b = PackedLoader(dataset, batch_size=2, seq_len=16, seed=5)
    c = PackedLoader(dataset, batch_size=2, seq_len=16, seed=6)
    first = a.batch_at(0, 0)
    assert batches_equal(first, b.batch_at(0, 0))
    assert not batches_equal(first, c.batch_at(0, 0))
    assert not batches_equal(first, a.batch_at(1, 0))
    tokens = sorted(torch.cat([x.input_ids.reshape(-1) for x in epoch_batches(a)]).tolist())
    assert len(tokens) == len(a) * 32  # every epoch is the same stream, reordered


def test_resume_gives_the_same_next_batches(dataset):
    """Save the position mid-epoch, continue in a fresh loader: the same batches as without the stop,
    across the end of the epoch."""
    reference = PackedLoader(dataset, batch_size=2, seq_len=16, seed=2)
    steps = len(reference) + 3
    expected = [reference.next_batch() for _ in range(steps)]
    interrupted = PackedLoader(dataset, batch_size=2, seq_len=16, seed=2)
    stop = len(reference) - 2
    for _ in range(stop):
        interrupted.next_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = PackedLoader(dataset, batch_size=2, seq_len=16, seed=2)
    resumed.load_state_dict(state)
    assert all(batches_equal(resumed.next_batch(), b) for b in expected[stop:])
    assert resumed.epoch == 1


def test_load_state_dict_rejects_other_settings(dataset):
    state = PackedLoader(dataset, batch_size=2, seq_len=16, seed=2).state_dict()
    with pytest.raises(ValueError, match="seq_len=16, 8"):
        PackedLoader(dataset, batch_size=2, seq_len=8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid loader position"):
        PackedLoader(dataset, batch_size=2, seq_len=16, seed=2).load_state_dict({**state, "batch": 10**6})


def test_ranks_read_disjoint_rows(dataset):
    """Rank r's batch g is rows [g*B*W + r*B, ...) of the epoch: the ranks' batches concatenated are
    the single-process batch of B*W rows."""
    world = 3
    ranks = [PackedLoader(dataset, batch_size=2, seq_len=8, seed=4, rank=r, world_size=world) for r in range(world)]
    single = PackedLoader(dataset, batch_size=2 * world, seq_len=8, seed=4)
    assert len({len(r) for r in ranks} | {len(single)}) == 1
    for g in range(len(single)):
        rows = torch.cat([r.batch_at(0, g).input_ids for r in ranks])
        assert torch.equal(rows, single.batch_at(0, g).input_ids)
    with pytest.raises(ValueError, match="rank must be in"):
        PackedLoader(dataset, batch_size=2, seq_len=8, rank=3, world_size=3)


def test_batches_feed_a_model(dataset):
    batch = PackedLoader(dataset, batch_size=2, seq_len=24, seed=0).next_batch()
    cfg = TransformerConfig(vocab_size=dataset.vocab.size, d_model=32, n_layer=1, n_heads=4, multiple_of=16,
                            modalities=list(dataset.vocab.names))
    dataset.vocab.check_model(cfg.vocab_size, cfg.modalities)
    out = build_model(cfg)(batch.input_ids, batch.modality_ids, labels=batch.labels, seq_idx=batch.seq_idx)
    assert torch.isfinite(out.loss) and set(out.loss_per_modality) <= {"text", "image", "speech"}
    assert bool((batch.labels[:, 0] == IGNORE_INDEX).all())  # a row starts a piece
    assert batch.num_targets == int((batch.labels != IGNORE_INDEX).sum()) > 0
