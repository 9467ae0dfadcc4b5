"""Token-stream files: round trips, and clear errors for missing, truncated, corrupt or inconsistent files."""
import os

import numpy as np
import pytest
import torch

from momoe.checkpoint import load_json
from momoe.data.format import (HEADER_FILE, MODALITIES_FILE, OFFSETS_FILE, TOKENS_FILE, TokenDataset,
                               TokenDatasetWriter, file_sha256)
from tests.data.helpers import edit_header, random_dataset, random_documents, small_vocab, write_dataset


@pytest.mark.parametrize("speech_units", [8, 70000], ids=["uint16", "uint32"])
def test_round_trip(tmp_path, speech_units):
    vocab = small_vocab(speech=speech_units)
    docs = random_documents(vocab, 30, seed=1)
    ds = write_dataset(tmp_path, docs, vocab, metadata={"source": "test"})
    assert ds.tokens.dtype == (np.uint16 if speech_units == 8 else np.uint32)
    assert len(ds) == 30 and ds.num_tokens == sum(len(ids) for ids, _ in docs)
    assert ds.vocab == vocab and ds.metadata == {"source": "test"}
    for (ids, mods), (got_ids, got_mods) in zip(docs, ds):
        assert torch.equal(ids, got_ids) and torch.equal(mods, got_mods)
    assert torch.equal(ds[-1][0], docs[-1][0])
    counts = ds.tokens_per_modality()
    assert sum(counts.values()) == ds.num_tokens and set(counts) == {"text", "image", "speech"}
    with pytest.raises(IndexError):
        ds[30]


def test_writer_rejects_bad_documents(tmp_path):
    vocab = small_vocab()
    writer = TokenDatasetWriter(str(tmp_path), vocab)
    ids = torch.tensor([vocab.bos, 65, vocab.eos])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 286\)"):
        writer.add(torch.tensor([vocab.size]), torch.tensor([0]))
    with pytest.raises(ValueError, match="does not match token 65"):
        writer.add(ids, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="non-empty token ids"):
        writer.add(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="has no documents"):
        writer.close()


def test_failed_write_leaves_no_header(tmp_path):
    random_dataset(tmp_path)
    with pytest.raises(RuntimeError):
        with TokenDatasetWriter(str(tmp_path), small_vocab()) as writer:
            writer.add(*random_documents(small_vocab(), 1)[0])
            raise RuntimeError("interrupted")
    with pytest.raises(ValueError, match="header.json does not exist"):
        TokenDataset(str(tmp_path))


def test_missing_and_truncated_files(tmp_path):
    truncated, missing = tmp_path / "truncated", tmp_path / "missing"
    random_dataset(truncated)
    random_dataset(missing)
    with open(truncated / TOKENS_FILE, "r+b") as f:
        f.truncate(os.path.getsize(truncated / TOKENS_FILE) - 2)
    with pytest.raises(ValueError, match="tokens.bin has .* bytes, the header says .*truncated"):
        TokenDataset(str(truncated))
    os.remove(missing / MODALITIES_FILE)
    with pytest.raises(ValueError, match="modalities.bin is missing"):
        TokenDataset(str(missing))
    with pytest.raises(ValueError, match="header.json does not exist"):
        TokenDataset(str(tmp_path / "nowhere"))


def test_corrupt_bytes_fail_the_checksum(tmp_path):
    random_dataset(tmp_path)
    with open(tmp_path / TOKENS_FILE, "r+b") as f:
        f.seek(10)
        f.write(b"\x01\x00")
    with pytest.raises(ValueError, match="tokens.bin does not match the checksum"):
        TokenDataset(str(tmp_path))
    assert len(TokenDataset(str(tmp_path), verify=False)) == 40  # sizes still fine


def rewrite(path, name, values: np.ndarray) -> None:
    """Replace a file's contents and its checksum, so that only the content checks can catch it."""
    values.tofile(path / name)
    files = load_json(str(path / HEADER_FILE))["files"]
    files[name]["sha256"] = file_sha256(str(path / name))
    edit_header(path, files=files)


def test_ids_out_of_vocabulary(tmp_path):
    ds = random_dataset(tmp_path)
    tokens = np.array(ds.tokens)
    tokens[5] = ds.vocab.size
    rewrite(tmp_path, TOKENS_FILE, tokens)
    with pytest.raises(ValueError, match=r"token id 286 outside the vocabulary \[0, 286\)"):
        TokenDataset(str(tmp_path))


def test_modalities_inconsistent_with_vocabulary(tmp_path):
    ds = random_dataset(tmp_path)
    modalities = np.array(ds.modalities)
    modalities[3] = (modalities[3] + 1) % 3
    rewrite(tmp_path, MODALITIES_FILE, modalities)
    with pytest.raises(ValueError, match="modality id .* at token 3 is inconsistent with the vocabulary ranges"):
        TokenDataset(str(tmp_path))


def test_bad_document_index(tmp_path):
    ds = random_dataset(tmp_path)
    offsets = np.array(ds.offsets)
    offsets[[1, 2]] = offsets[[2, 1]]
    rewrite(tmp_path, OFFSETS_FILE, offsets)
    with pytest.raises(ValueError, match="not a valid document index"):
        TokenDataset(str(tmp_path))


def test_header_mismatches(tmp_path):
    ds = random_dataset(tmp_path)
    header = load_json(str(tmp_path / HEADER_FILE))
    edit_header(tmp_path, num_tokens=ds.num_tokens + 1)
    with pytest.raises(ValueError, match="describes tokens.bin as .* expected dtype uint16 and"):
        TokenDataset(str(tmp_path))
    edit_header(tmp_path, num_tokens=header["num_tokens"], version=2)
    with pytest.raises(ValueError, match="format version 2; this momoe reads version 1"):
        TokenDataset(str(tmp_path))
    edit_header(tmp_path, version=1, format="something-else")
    with pytest.raises(ValueError, match="not a momoe token dataset"):
        TokenDataset(str(tmp_path))
    edit_header(tmp_path, format=header["format"], vocab={**header["vocab"], "size": 999})
    with pytest.raises(ValueError, match="malformed .* does not match its ranges"):
        TokenDataset(str(tmp_path))


def test_wrong_vocabulary(tmp_path):
    ds = random_dataset(tmp_path)
    ds.check_vocab(small_vocab())
    with pytest.raises(ValueError, match="tokenized with another vocabulary"):
        ds.check_vocab(small_vocab(image=32))
