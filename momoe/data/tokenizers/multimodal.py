"""The interleaved tokenizer: per-modality tokenizers behind one vocabulary.

A document is a list of `(modality, payload)` spans: `("text", str)`, `("image", Tensor [H, W] in
[0, 1])`, `("speech", Tensor [S] waveform)`. It is encoded as `<bos> span ... <eos>`, image and
speech spans bracketed by their markers (see momoe.data.vocab), and decoded back span by span
(adjacent text spans come back merged, as text has no span markers).

Saved as `tokenizer.json` (vocabulary layout and each tokenizer's settings) and
`tokenizer.safetensors` (codebooks as `<modality>.<name>` tensors); no pickle.

Shape legend: T tokens.
"""
import os
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from momoe.checkpoint import load_json, load_weights, save_json, save_weights
from momoe.data.tokenizers.image import PatchTokenizer
from momoe.data.tokenizers.speech import SpeechTokenizer
from momoe.data.tokenizers.text import ByteTokenizer
from momoe.data.vocab import TEXT, Vocabulary

ModalityTokenizer = Union[ByteTokenizer, PatchTokenizer, SpeechTokenizer]
Document = Sequence[Tuple[str, Any]]

TOKENIZER_CLASSES = {cls.name: cls for cls in (ByteTokenizer, PatchTokenizer, SpeechTokenizer)}
TOKENIZER_FORMAT = "momoe-tokenizer"
TOKENIZER_VERSION = 1
CONFIG_FILE = "tokenizer.json"
TENSORS_FILE = "tokenizer.safetensors"


class MultimodalTokenizer:
    """Encode and decode interleaved documents.

    Args:
        tokenizers: the modality tokenizers in vocabulary order, text first (e.g. ByteTokenizer(),
            PatchTokenizer, SpeechTokenizer); the vocabulary is built from their sizes.

    Example:
        >>> tok = MultimodalTokenizer([ByteTokenizer()])
        >>> ids, modality_ids = tok.encode([("text", "hi")])
        >>> ids.tolist(), tok.decode(ids)
        ([256, 104, 105, 257], [('text', 'hi')])
    """

    def __init__(self, tokenizers: Sequence[ModalityTokenizer]) -> None:
        self.tokenizers: Dict[str, ModalityTokenizer] = {t.name: t for t in tokenizers}
        if len(self.tokenizers) != len(tokenizers):
            raise ValueError(f"momoe: one tokenizer per modality, got {[t.name for t in tokenizers]}")
        self.vocab = Vocabulary.build({t.name: t.num_codes for t in tokenizers})

    def tokenizer(self, modality: str) -> ModalityTokenizer:
        if modality not in self.tokenizers:
            raise ValueError(f"momoe: no tokenizer for modality {modality!r}; have {list(self.tokenizers)}")
        return self.tokenizers[modality]

    def encode_span(self, modality: str, payload: Any) -> torch.Tensor:
        """One span's ids `[T]`, with its begin/end markers for image and speech."""
        ids = self.vocab.to_global(modality, self.tokenizer(modality).encode(payload))
        m = self.vocab.modality(modality)
        if m.begin is None:
            return ids
        return torch.cat([torch.tensor([m.begin]), ids, torch.tensor([m.end])])

    def encode(self, document: Document) -> Tuple[torch.Tensor, torch.Tensor]:
        """document: `[(modality, payload), ...]`. Returns token ids `[T]` and modality ids `[T]` (int64)."""
        if not document:
            raise ValueError("momoe: a document needs at least one span")
        ids = torch.cat([torch.tensor([self.vocab.bos])]
                        + [self.encode_span(modality, payload) for modality, payload in document]
                        + [torch.tensor([self.vocab.eos])])
        return ids, self.vocab.modality_of(ids)

    def decode(self, token_ids: torch.Tensor) -> List[Tuple[str, Any]]:
        """token_ids (Tensor): `[T]`, one document (<bos> and <eos> optional at its ends). Returns the
        spans `[(modality, payload), ...]`; misplaced markers or unterminated spans raise ValueError."""
        if token_ids.dim() != 1:
            raise ValueError(f"momoe: decode takes one document of shape (T,), got {tuple(token_ids.shape)}")
        mods = self.vocab.modality_of(token_ids).tolist()
        ids = token_ids.tolist()
        start = 1 if ids[:1] == [self.vocab.bos] else 0
        stop = len(ids) - 1 if len(ids) > start and ids[-1] == self.vocab.eos else len(ids)
        if self.vocab.bos in ids[start:stop] or self.vocab.eos in ids[start:stop]:
            raise ValueError("momoe: <bos>/<eos> may only open and close a document")
        spans = []
        i = start
        while i < stop:
            m = self.vocab.modalities[mods[i]]
            if m.name == TEXT:
                j = i
                while j < stop and mods[j] == mods[i]:
                    j += 1
                spans.append((m.name, ids[i:j]))
                i = j
                continue
            if ids[i] != m.begin:
                raise ValueError(f"momoe: {m.name} token {ids[i]} at position {i} is outside a {m.name} span")
            j = i + 1
            while j < stop and ids[j] != m.end:
                j += 1
            if j == stop:
                raise ValueError(f"momoe: the {m.name} span opened at position {i} is not closed")
            spans.append((m.name, ids[i + 1:j]))
            i = j + 1
        return [(name, self.tokenizer(name).decode(self.vocab.to_local(name, torch.tensor(span, dtype=torch.long))))
                for name, span in spans]

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Write path/tokenizer.json and path/tokenizer.safetensors (each atomically)."""
        tensors = {f"{name}.{key}": t for name, tok in self.tokenizers.items() for key, t in tok.tensors().items()}
        save_weights(tensors, os.path.join(path, TENSORS_FILE))
        save_json({"format": TOKENIZER_FORMAT, "version": TOKENIZER_VERSION, "vocab": self.vocab.to_dict(),
                   "tokenizers": [{"name": name, "config": tok.config()} for name, tok in self.tokenizers.items()]},
                  os.path.join(path, CONFIG_FILE))

    @classmethod
    def load(cls, path: str) -> "MultimodalTokenizer":
        """Read a tokenizer written by save; a wrong format, version or vocabulary raises ValueError."""
        data = load_json(os.path.join(path, CONFIG_FILE))
        if data.get("format") != TOKENIZER_FORMAT or data.get("version") != TOKENIZER_VERSION:
            raise ValueError(f"momoe: {path} holds format {data.get('format')!r} version {data.get('version')!r}, "
                             f"expected {TOKENIZER_FORMAT!r} version {TOKENIZER_VERSION}")
        tensors = load_weights(os.path.join(path, TENSORS_FILE))
        tokenizers = []
        for entry in data.get("tokenizers", []):
            name = entry["name"]
            if name not in TOKENIZER_CLASSES:
                raise ValueError(f"momoe: unknown tokenizer {name!r} in {path}; known: {sorted(TOKENIZER_CLASSES)}")
            prefix = name + "."
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            try:
                tokenizers.append(TOKENIZER_CLASSES[name].from_state(entry["config"], own))
            except KeyError as error:
                raise ValueError(f"momoe: the {name} tokenizer in {path} lacks {error}") from None
        tokenizer = cls(tokenizers)
        if tokenizer.vocab != Vocabulary.from_dict(data["vocab"]):
            raise ValueError(f"momoe: the vocabulary stored in {path} does not match its tokenizers")
        return tokenizer
