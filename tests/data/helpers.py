"""Small vocabularies and random token datasets shared by the data tests."""
import os
from typing import List, Tuple

import torch

from momoe.checkpoint import load_json, save_json
from momoe.data.format import HEADER_FILE, TokenDataset, TokenDatasetWriter
from momoe.data.vocab import Vocabulary


def small_vocab(image: int = 16, speech: int = 8) -> Vocabulary:
    return Vocabulary.build({"text": 256, "image": image, "speech": speech})


def random_document(vocab: Vocabulary, gen: torch.Generator, max_spans: int = 3) -> torch.Tensor:
    """<bos>, 1..max_spans random spans (text bytes, or bracketed image/speech codes), <eos>: ids `[T]`."""
    pieces = [torch.tensor([vocab.bos])]
    for _ in range(int(torch.randint(1, max_spans + 1, (1,), generator=gen))):
        m = vocab.modalities[int(torch.randint(len(vocab.modalities), (1,), generator=gen))]
        n = int(torch.randint(1, 12, (1,), generator=gen))
        codes = torch.randint(m.payload_size, (n,), generator=gen)
        ids = vocab.to_global(m.name, codes)
        if m.begin is not None:
            ids = torch.cat([torch.tensor([m.begin]), ids, torch.tensor([m.end])])
        pieces.append(ids)
    pieces.append(torch.tensor([vocab.eos]))
    return torch.cat(pieces)


def random_documents(vocab: Vocabulary, num_docs: int, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    docs = [random_document(vocab, gen) for _ in range(num_docs)]
    return [(ids, vocab.modality_of(ids)) for ids in docs]


def write_dataset(path: str, docs, vocab: Vocabulary, metadata=None) -> TokenDataset:
    with TokenDatasetWriter(str(path), vocab, metadata) as writer:
        for ids, mods in docs:
            writer.add(ids, mods)
    return TokenDataset(str(path))


def random_dataset(path, num_docs: int = 40, seed: int = 0) -> TokenDataset:
    vocab = small_vocab()
    return write_dataset(path, random_documents(vocab, num_docs, seed), vocab)


def edit_header(path, **changes) -> None:
    """Change top-level header fields of a dataset folder (keeping the file valid JSON)."""
    file = os.path.join(str(path), HEADER_FILE)
    header = load_json(file)
    header.update(changes)
    save_json(header, file)
