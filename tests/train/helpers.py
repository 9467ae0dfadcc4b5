"""A tiny tri-modal dataset root (train, validation, tokenizer) and tiny models for the training tests."""
import os

import pytest
import torch

from momoe.data import ByteTokenizer, MultimodalTokenizer, PatchTokenizer, SpeechTokenizer, TokenDatasetWriter
from momoe.data.builtin import TOKENIZER_DIR
from momoe.train.specs import family_config

WORDS = ("zero", "one", "two", "three")


def tiny_tokenizer() -> MultimodalTokenizer:
    """Bytes, 4x4 images as four 2x2 patches of a 16-code book, speech as 8 units (untrained codebooks)."""
    gen = torch.Generator().manual_seed(0)
    image = PatchTokenizer(torch.rand(16, 4, generator=gen), patch_size=2, image_size=(4, 4))
    speech = SpeechTokenizer(torch.randn(8, 8, generator=gen), torch.rand(8, 33, generator=gen), sample_rate=8000,
                             n_fft=64, hop_length=16, frames_per_unit=2, griffin_lim_iters=4)
    return MultimodalTokenizer([ByteTokenizer(), image, speech])


def document(tokenizer: MultimodalTokenizer, index: int):
    """A caption, its 'image' (a bar at the digit's row) and its 'speech' (a tone), in a varying order."""
    digit = index % len(WORDS)
    image = torch.zeros(4, 4)
    image[digit] = 1.0
    tone = torch.sin(torch.arange(320) * (0.2 + 0.3 * digit))
    spans = [("text", f"a {WORDS[digit]}"), ("image", image), ("speech", tone)]
    order = [spans[i] for i in ((0, 1, 2), (1, 0, 2), (2, 0, 1))[index % 3]]
    return tokenizer.encode(order)


def make_dataset_root(root, train_docs: int = 48, validation_docs: int = 12) -> str:
    """A dataset root like momoe/data/builtin: train/, validation/, tokenizer/. Returns its path."""
    root = str(root)
    tokenizer = tiny_tokenizer()
    tokenizer.save(os.path.join(root, TOKENIZER_DIR))
    for split, count, offset in (("train", train_docs, 0), ("validation", validation_docs, 1000)):
        with TokenDatasetWriter(os.path.join(root, split), tokenizer.vocab, {"name": "tiny"}) as writer:
            for i in range(count):
                writer.add(*document(tokenizer, offset + i))
    return root


def tiny_config(family: str, vocab, **sizes):
    """A very small model of `family` for the dataset's vocabulary."""
    return family_config(family, vocab, **{"d_model": 32, "n_layer": 2, "n_heads": 2, **sizes})


@pytest.fixture
def single_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
