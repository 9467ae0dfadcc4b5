"""The unified vocabulary: one contiguous id range per modality, with begin/end markers for spans.

Layout (every number is stored in the dataset header and the tokenizer file, so readers never
assume it):

```
text    [0, 258)            bytes 0..255 (id == byte value), <bos> 256, <eos> 257 (document markers)
image   [258, 260 + K_img)  <boi>, <eoi>, then the K_img patch codes
speech  [.., .. + 2 + K_sp) <bosp>, <eosp>, then the K_sp speech units
```

A document is `<bos> span span ... <eos>`; text spans have no markers of their own (as in
Chameleon), image and speech spans are bracketed by their modality's markers. A token's modality
is a function of its id alone (markers belong to the modality whose range holds them), so
`modality_of(ids)` recovers the modality ids a model needs, also for generated tokens.

Shape legend: T tokens.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

TEXT = "text"
DOCUMENT_MARKERS = ("<bos>", "<eos>")
SPAN_MARKERS = {"image": ("<boi>", "<eoi>"), "speech": ("<bosp>", "<eosp>")}
TEXT_PAYLOAD = 256  # byte-level text


@dataclasses.dataclass(frozen=True)
class ModalityRange:
    """The ids of one modality: [start, stop); its payload (bytes, codes, units) is
    [payload_start, payload_start + payload_size); begin/end: its span markers (None for text)."""

    name: str
    start: int
    stop: int
    payload_start: int
    payload_size: int
    begin: Optional[int]
    end: Optional[int]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Per-modality id ranges covering [0, size) in order, and the document markers (text ids)."""

    modalities: Tuple[ModalityRange, ...]
    bos: int
    eos: int

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def build(cls, payload_sizes: Mapping[str, int]) -> "Vocabulary":
        """The standard layout for `{"text": 256, "image": K_img, "speech": K_sp}` (text first; the
        other modalities in the given order, each needs an entry in SPAN_MARKERS)."""
        names = list(payload_sizes)
        if not names or names[0] != TEXT or payload_sizes[TEXT] != TEXT_PAYLOAD:
            raise ValueError(f"momoe: the vocabulary starts with byte-level text ({TEXT!r}: {TEXT_PAYLOAD}), "
                             f"got {dict(payload_sizes)}")
        ranges = [ModalityRange(TEXT, 0, TEXT_PAYLOAD + 2, 0, TEXT_PAYLOAD, None, None)]
        for name in names[1:]:
            if name not in SPAN_MARKERS:
                raise ValueError(f"momoe: no span markers for modality {name!r}; known: {sorted(SPAN_MARKERS)}")
            start = ranges[-1].stop
            size = int(payload_sizes[name])
            ranges.append(ModalityRange(name, start, start + 2 + size, start + 2, size, start, start + 1))
        return cls(tuple(ranges), bos=TEXT_PAYLOAD, eos=TEXT_PAYLOAD + 1)

    # ------------------------------------------------------------------ layout
    @property
    def size(self) -> int:
        return self.modalities[-1].stop

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def modality_index(self, name: str) -> int:
        """The modality id of `name` (its position in the layout, as in a model config's modalities)."""
        if name not in self.names:
            raise ValueError(f"momoe: unknown modality {name!r}; this vocabulary has {list(self.names)}")
        return self.names.index(name)

    def modality(self, name: str) -> ModalityRange:
        return self.modalities[self.modality_index(name)]

    def check(self) -> None:
        """Raise ValueError unless the ranges tile [0, size), payloads and markers lie inside their own
        range without overlapping, and <bos>/<eos> are text ids outside the byte payload."""
        if not self.modalities or self.modalities[0].name != TEXT:
            raise ValueError(f"momoe: the first modality of a vocabulary must be {TEXT!r}, got {list(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"momoe: duplicate modality names {list(self.names)}")
        expected_start = 0
        for m in self.modalities:
            if m.start != expected_start or m.stop <= m.start:
                raise ValueError(f"momoe: modality {m.name!r} range [{m.start}, {m.stop}) must start at "
                                 f"{expected_start} and be non-empty (ranges tile the vocabulary in order)")
            expected_start = m.stop
            payload = set(range(m.payload_start, m.payload_start + m.payload_size))
            markers = [i for i in (m.begin, m.end) if i is not None]
            if m.name == TEXT:
                markers += [self.bos, self.eos]
            elif m.begin is None or m.end is None:
                raise ValueError(f"momoe: modality {m.name!r} needs begin and end span markers")
            ids = sorted(payload) + markers
            if m.payload_size <= 0 or len(set(ids)) != len(ids) or min(ids) < m.start or max(ids) >= m.stop:
                raise ValueError(f"momoe: modality {m.name!r}: payload [{m.payload_start}, "
                                 f"{m.payload_start + m.payload_size}) and markers {markers} must be distinct "
                                 f"ids inside its range [{m.start}, {m.stop})")
            if len(ids) != m.stop - m.start:
                raise ValueError(f"momoe: modality {m.name!r} range [{m.start}, {m.stop}) has ids that are "
                                 f"neither payload nor markers")

    # ------------------------------------------------------------------ ids
    def modality_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids (Tensor): ids of any shape, in [0, size). Returns the modality index of each
        (same shape, int64)."""
        self.check_ids(token_ids)
        stops = torch.tensor([m.stop for m in self.modalities], device=token_ids.device)
        return torch.bucketize(token_ids.long(), stops, right=True)

    def check_ids(self, token_ids: torch.Tensor) -> None:
        if token_ids.is_floating_point():
            raise ValueError(f"momoe: token ids must be integers, got {token_ids.dtype}")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.size):
            raise ValueError(f"momoe: token ids must be in [0, {self.size}) (the vocabulary), got values in "
                             f"[{int(token_ids.min())}, {int(token_ids.max())}]")

    def to_global(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        """codes (Tensor): `[T]` payload codes of modality `name` in [0, payload_size). Returns `[T]` ids."""
        m = self.modality(name)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= m.payload_size):
            raise ValueError(f"momoe: {name} codes must be in [0, {m.payload_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes.long() + m.payload_start

    def to_local(self, name: str, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids (Tensor): `[T]` payload ids of modality `name`. Returns `[T]` codes in [0, payload_size)."""
        m = self.modality(name)
        codes = token_ids.long() - m.payload_start
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= m.payload_size):
            raise ValueError(f"momoe: ids [{int(token_ids.min())}, {int(token_ids.max())}] are not all {name} "
                             f"payload ids [{m.payload_start}, {m.payload_start + m.payload_size})")
        return codes

    def check_model(self, vocab_size: int, modalities: Sequence[str]) -> None:
        """Raise ValueError unless a model with `vocab_size` embeddings and these modality names (a
        config's `modalities`, in modality-id order) can read token streams of this vocabulary."""
        if vocab_size < self.size:
            raise ValueError(f"momoe: the data needs vocab_size >= {self.size}, the model has {vocab_size}")
        if tuple(modalities) != self.names:
            raise ValueError(f"momoe: the data's modalities are {list(self.names)} (in id order), the model's are "
                             f"{list(modalities)}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {"size": self.size, "bos": self.bos, "eos": self.eos,
                "modalities": [dataclasses.asdict(m) for m in self.modalities]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Vocabulary":
        """Inverse of to_dict; a malformed or inconsistent layout raises ValueError."""
        try:
            ranges = tuple(ModalityRange(**m) for m in data["modalities"])
            vocab = cls(ranges, bos=int(data["bos"]), eos=int(data["eos"]))
            size = int(data["size"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"momoe: malformed vocabulary layout ({error!r})") from None
        if size != vocab.size:
            raise ValueError(f"momoe: vocabulary size {size} does not match its ranges (which end at {vocab.size})")
        return vocab

    def describe(self) -> Sequence[str]:
        """One line per modality, e.g. 'image  [258, 518): <boi> 258, <eoi> 259, 256 codes from 260'."""
        lines = []
        for m in self.modalities:
            if m.name == TEXT:
                markers = f"{DOCUMENT_MARKERS[0]} {self.bos}, {DOCUMENT_MARKERS[1]} {self.eos}"
            else:
                begin, end = SPAN_MARKERS.get(m.name, ("<begin>", "<end>"))
                markers = f"{begin} {m.begin}, {end} {m.end}"
            lines.append(f"{m.name:<7}[{m.start}, {m.stop}): {markers}, {m.payload_size} payload ids from "
                         f"{m.payload_start}")
        return lines
