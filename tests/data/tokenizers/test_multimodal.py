"""Interleaved documents through the unified vocabulary: layout, round trips, files, malformed streams."""
import pytest
import torch

from momoe.checkpoint import load_json, save_json
from momoe.data.tokenizers import ByteTokenizer, MultimodalTokenizer, PatchTokenizer, SpeechTokenizer

RATE = 8000


@pytest.fixture(scope="module")
def tokenizer():
    gen = torch.Generator().manual_seed(0)
    image = PatchTokenizer(torch.rand(16, 4, generator=gen), patch_size=2, image_size=(8, 8))
    speech = SpeechTokenizer(torch.randn(8, 12, generator=gen), torch.rand(8, 129, generator=gen), RATE, n_fft=256,
                             hop_length=80, frames_per_unit=2, griffin_lim_iters=4)
    return MultimodalTokenizer([ByteTokenizer(), image, speech])


def document():
    gen = torch.Generator().manual_seed(1)
    return [("image", torch.rand(8, 8, generator=gen)), ("text", "a handwritten seven"),
            ("speech", torch.randn(800, generator=gen) * 0.1)]


def test_layout_of_an_encoded_document(tokenizer):
    vocab = tokenizer.vocab
    ids, mods = tokenizer.encode(document())
    image, speech = vocab.modality("image"), vocab.modality("speech")
    n_text, n_speech = len("a handwritten seven"), 6  # 1 + 800 // 80 = 11 frames -> 6 units
    assert ids.shape == mods.shape == (1 + 18 + n_text + 2 + n_speech + 1,)
    assert ids[0] == vocab.bos and ids[-1] == vocab.eos
    assert ids[1] == image.begin and ids[18] == image.end
    assert bytes(ids[19:19 + n_text].tolist()).decode() == "a handwritten seven"
    assert ids[19 + n_text] == speech.begin and ids[-2] == speech.end
    assert torch.equal(mods, vocab.modality_of(ids))
    assert mods.tolist() == [0] + [1] * 18 + [0] * n_text + [2] * (n_speech + 2) + [0]


def test_decode_inverts_encode(tokenizer):
    doc = document()
    spans = tokenizer.decode(tokenizer.encode(doc)[0])
    assert [m for m, _ in spans] == ["image", "text", "speech"]
    image_tok = tokenizer.tokenizer("image")
    assert torch.equal(spans[0][1], image_tok.decode(image_tok.encode(doc[0][1])))
    assert spans[1][1] == "a handwritten seven"
    assert spans[2][1].shape == ((6 * 2 - 1) * 80,)
    text_only = tokenizer.encode([("text", "one "), ("text", "two")])[0]
    assert tokenizer.decode(text_only) == [("text", "one two")]  # text spans have no markers
    assert tokenizer.decode(text_only[1:-1]) == [("text", "one two")]  # <bos>/<eos> optional


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    loaded = MultimodalTokenizer.load(str(tmp_path))
    assert loaded.vocab == tokenizer.vocab
    assert torch.equal(loaded.encode(document())[0], tokenizer.encode(document())[0])
    config = load_json(str(tmp_path / "tokenizer.json"))
    config["vocab"]["modalities"][1]["payload_size"] = 17
    save_json(config, str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="momoe: modality 'image'"):
        MultimodalTokenizer.load(str(tmp_path))
    save_json({**config, "version": 99}, str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="version 99"):
        MultimodalTokenizer.load(str(tmp_path))


def test_malformed_streams(tokenizer):
    vocab = tokenizer.vocab
    image, speech = vocab.modality("image"), vocab.modality("speech")
    codes = list(range(image.payload_start, image.payload_start + 16))
    with pytest.raises(ValueError, match="image span opened at position 1 is not closed"):
        tokenizer.decode(torch.tensor([vocab.bos, image.begin, *codes]))
    with pytest.raises(ValueError, match="image token .* at position 1 is outside a image span"):
        tokenizer.decode(torch.tensor([vocab.bos, *codes, image.end]))
    with pytest.raises(ValueError, match="may only open and close a document"):
        tokenizer.decode(torch.tensor([65, vocab.bos, 66]))
    with pytest.raises(ValueError, match="not all image payload ids"):
        tokenizer.decode(torch.tensor([image.begin, speech.payload_start, image.end]))
    with pytest.raises(ValueError, match="at least one span"):
        tokenizer.encode([])
    with pytest.raises(ValueError, match="no tokenizer for modality 'video'"):
        tokenizer.encode([("video", None)])
