"""The embedded dataset loads offline, holds all three modalities in varied orders, and decodes."""
import itertools

import pytest
import torch

from momoe.data import SPLITS, PackedLoader, load_builtin, load_dataset, load_tokenizer
from momoe.data.builtin import BUILTIN_DIR

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def span_order(modality_ids: torch.Tensor) -> tuple:
    """The modality names of a document's spans, in order (<bos>/<eos> dropped)."""
    names = ("text", "image", "speech")
    return tuple(names[m] for m, _ in itertools.groupby(modality_ids[1:-1].tolist()))


@pytest.mark.parametrize("split", SPLITS)
def test_splits_load_and_hold_three_modalities(split, tokenizer):
    ds = load_builtin(split)  # verify=True: checksums, id ranges, modality ids
    ds.check_vocab(tokenizer.vocab)
    assert ds.vocab.names == ("text", "image", "speech")
    counts = ds.tokens_per_modality()
    assert all(counts[m] > 0 for m in ds.vocab.names), counts
    assert "espeak-ng" in ds.metadata["speech"] and ds.metadata["split"] == split
    orders = {span_order(ds[i][1]) for i in range(min(len(ds), 400))}
    for pair in [("text", "image"), ("image", "text"), ("text", "speech"), ("speech", "text")]:
        assert pair in orders
    assert any(len(order) == 3 and set(order) == {"text", "image", "speech"} for order in orders)


def test_documents_decode_to_text_images_and_speech(tokenizer):
    ds = load_builtin("validation")
    seen = set()
    for ids, mods in ds:
        order = span_order(mods)
        if len(order) != 3:
            continue
        spans = dict(tokenizer.decode(ids))
        assert any(word in spans["text"] or str(d) in spans["text"] for d, word in enumerate(DIGIT_WORDS))
        assert spans["image"].shape == (8, 8) and 0 <= float(spans["image"].min()) <= float(spans["image"].max()) <= 1
        assert spans["speech"].dim() == 1 and spans["speech"].numel() > 0
        seen.add(order)
        break
    assert seen


def test_a_loader_over_the_builtin_split():
    batch = PackedLoader(load_builtin("train", verify=False), batch_size=4, seq_len=128).next_batch()
    assert batch.input_ids.shape == (4, 128) and int(batch.seq_idx.max()) > 0


def test_dataset_sources(tmp_path):
    assert load_dataset(BUILTIN_DIR, "validation").num_tokens == load_builtin("validation").num_tokens
    single = load_dataset(f"{BUILTIN_DIR}/train", "ignored-for-a-dataset-folder", verify=False)
    assert len(single) == len(load_builtin("train", verify=False))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_builtin("test")
    with pytest.raises(ValueError, match="has no 'train' split"):
        load_dataset(str(tmp_path), "train")
