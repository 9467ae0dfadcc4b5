"""The unified vocabulary: layout, modality of ids, payload conversion, serialisation errors."""
import dataclasses

import pytest
import torch

from momoe.data.vocab import Vocabulary
from tests.data.helpers import small_vocab


def test_standard_layout():
    vocab = small_vocab(image=16, speech=8)
    assert vocab.names == ("text", "image", "speech")
    assert (vocab.bos, vocab.eos, vocab.size) == (256, 257, 258 + 18 + 10)
    image, speech = vocab.modality("image"), vocab.modality("speech")
    assert (image.start, image.begin, image.end, image.payload_start, image.stop) == (258, 258, 259, 260, 276)
    assert (speech.start, speech.begin, speech.end, speech.payload_start, speech.stop) == (276, 276, 277, 278, 286)
    assert vocab.modality_index("speech") == 2


def test_modality_of_every_id():
    vocab = small_vocab()
    ids = torch.arange(vocab.size)
    expected = torch.cat([torch.full((m.stop - m.start,), i) for i, m in enumerate(vocab.modalities)])
    assert torch.equal(vocab.modality_of(ids), expected)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 286\)"):
        vocab.modality_of(torch.tensor([0, 286]))


def test_payload_ids_round_trip_and_errors():
    vocab = small_vocab()
    codes = torch.tensor([0, 7, 15])
    ids = vocab.to_global("image", codes)
    assert torch.equal(ids, codes + 260)
    assert torch.equal(vocab.to_local("image", ids), codes)
    with pytest.raises(ValueError, match=r"image codes must be in \[0, 16\)"):
        vocab.to_global("image", torch.tensor([16]))
    with pytest.raises(ValueError, match="not all speech payload ids"):
        vocab.to_local("speech", ids)
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        vocab.modality("video")


def test_dict_round_trip_and_bad_layouts():
    vocab = small_vocab()
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    data = vocab.to_dict()
    with pytest.raises(ValueError, match="does not match its ranges"):
        Vocabulary.from_dict({**data, "size": vocab.size + 1})
    overlapping = [dict(m) for m in data["modalities"]]
    overlapping[2]["start"] -= 1
    with pytest.raises(ValueError, match="must start at"):
        Vocabulary.from_dict({**data, "modalities": overlapping})
    with pytest.raises(ValueError, match="malformed vocabulary"):
        Vocabulary.from_dict({"modalities": []})
    image = vocab.modalities[1]
    with pytest.raises(ValueError, match="distinct ids inside its range"):
        Vocabulary((vocab.modalities[0], dataclasses.replace(image, end=image.begin), vocab.modalities[2]),
                   vocab.bos, vocab.eos)
    with pytest.raises(ValueError, match="starts with byte-level text"):
        Vocabulary.build({"image": 16})


def test_check_model():
    vocab = small_vocab()
    vocab.check_model(vocab.size, ["text", "image", "speech"])
    vocab.check_model(65536, ("text", "image", "speech"))
    with pytest.raises(ValueError, match="vocab_size >= 286"):
        vocab.check_model(100, ["text", "image", "speech"])
    with pytest.raises(ValueError, match="modalities are"):
        vocab.check_model(vocab.size, ["text", "speech", "image"])
