"""Token-stream datasets on disk: memory-mapped token and modality ids, a document index, a JSON header.

A dataset is a folder:

```
header.json     {"format": "momoe-tokens", "version": 1, "vocab": {...layout, see momoe.data.vocab},
                 "num_tokens": T, "num_documents": N, "metadata": {...free-form provenance},
                 "files": {"tokens.bin": {"dtype": "uint16", "count": T, "bytes": .., "sha256": ..}, ...}}
tokens.bin      [T] token ids, little-endian uint16 (vocabularies up to 65536 ids) or uint32
modalities.bin  [T] uint8 modality ids (index into the vocabulary's modalities)
offsets.bin     [N + 1] int64: document i is tokens[offsets[i]:offsets[i + 1]]
```

The header is written last (atomically), so a folder without one is an unfinished write. Readers
check sizes always and, with `verify=True`, checksums, id ranges and that every modality id is the
one the vocabulary gives its token; any problem is a ValueError that names the file.
"""
import hashlib
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch

from momoe.checkpoint import load_json, save_json
from momoe.data.vocab import Vocabulary

FORMAT_NAME = "momoe-tokens"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
TOKENS_FILE = "tokens.bin"
MODALITIES_FILE = "modalities.bin"
OFFSETS_FILE = "offsets.bin"
VERIFY_CHUNK = 1 << 20
HASH_BLOCK = 1 << 20


def token_dtype(vocab: Vocabulary) -> np.dtype:
    return np.dtype("<u2") if vocab.size <= 1 << 16 else np.dtype("<u4")


def modality_lookup(vocab: Vocabulary, token_ids: np.ndarray) -> np.ndarray:
    """The modality id of each token id (numpy twin of Vocabulary.modality_of, for memory maps)."""
    stops = np.array([m.stop for m in vocab.modalities])
    return np.searchsorted(stops, token_ids, side="right")


class TokenDatasetWriter:
    """Append documents to a new dataset folder; `close()` (or leaving the `with` block) writes the
    index and the header. An exception inside the `with` block leaves no header (unreadable folder).

    Example:
        >>> with TokenDatasetWriter("data/train", tokenizer.vocab, {"source": "mine"}) as writer:
        ...     writer.add(*tokenizer.encode([("text", "hello")]))
    """

    def __init__(self, path: str, vocab: Vocabulary, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.path = path
        self.vocab = vocab
        self.metadata = dict(metadata or {})
        self.dtype = token_dtype(vocab)
        os.makedirs(path, exist_ok=True)
        header = os.path.join(path, HEADER_FILE)
        if os.path.exists(header):
            os.remove(header)  # the old header must not describe half-written new files
        self.files = {name: open(os.path.join(path, name), "wb") for name in (TOKENS_FILE, MODALITIES_FILE)}
        self.hashes = {name: hashlib.sha256() for name in self.files}
        self.offsets = [0]

    def __enter__(self) -> "TokenDatasetWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            for f in self.files.values():
                f.close()

    def _write(self, name: str, data: bytes) -> None:
        self.files[name].write(data)
        self.hashes[name].update(data)

    def add(self, token_ids: torch.Tensor, modality_ids: torch.Tensor) -> None:
        """token_ids, modality_ids (Tensor): one document `[T]` (T >= 1), as MultimodalTokenizer.encode
        returns them; ids outside the vocabulary or modality ids that disagree with it raise ValueError."""
        if token_ids.dim() != 1 or token_ids.numel() == 0 or modality_ids.shape != token_ids.shape:
            raise ValueError(f"momoe: a document is non-empty token ids (T,) with modality ids of the same shape, "
                             f"got {tuple(token_ids.shape)} and {tuple(modality_ids.shape)}")
        expected = self.vocab.modality_of(token_ids)
        if not torch.equal(expected, modality_ids.long()):
            bad = int((expected != modality_ids.long()).nonzero()[0, 0])
            raise ValueError(f"momoe: modality id {int(modality_ids[bad])} at position {bad} does not match token "
                             f"{int(token_ids[bad])}, which the vocabulary puts in modality {int(expected[bad])}")
        self._write(TOKENS_FILE, token_ids.cpu().numpy().astype(self.dtype).tobytes())
        self._write(MODALITIES_FILE, modality_ids.cpu().numpy().astype(np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + token_ids.numel())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if len(self.offsets) < 2:
            raise ValueError(f"momoe: dataset {self.path} has no documents")
        offsets = np.array(self.offsets, dtype="<i8").tobytes()
        with open(os.path.join(self.path, OFFSETS_FILE), "wb") as f:
            f.write(offsets)
        self.hashes[OFFSETS_FILE] = hashlib.sha256(offsets)
        num_tokens = self.offsets[-1]
        counts = {TOKENS_FILE: num_tokens, MODALITIES_FILE: num_tokens, OFFSETS_FILE: len(self.offsets)}
        dtypes = {TOKENS_FILE: self.dtype, MODALITIES_FILE: np.dtype(np.uint8), OFFSETS_FILE: np.dtype("<i8")}
        files = {name: {"dtype": dtypes[name].name, "count": counts[name], "bytes": counts[name] * dtypes[name].itemsize,
                        "sha256": self.hashes[name].hexdigest()} for name in counts}
        save_json({"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab": self.vocab.to_dict(),
                   "num_tokens": num_tokens, "num_documents": len(self.offsets) - 1, "files": files,
                   "metadata": self.metadata}, os.path.join(self.path, HEADER_FILE))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class TokenDataset:
    """A dataset folder opened read-only: `len(ds)` documents, `ds[i]` -> (token ids `[T_i]`,
    modality ids `[T_i]`) as int64 tensors.

    Attributes:
        vocab (Vocabulary); metadata (dict); tokens, modalities: `[T]` memory-mapped numpy arrays;
        offsets: `[N + 1]` int64 numpy array; lengths: `[N]` tokens per document.

    Args:
        path: the folder; verify: also check checksums, id ranges and modality ids (reads every byte
            once; pass False to open large datasets instantly; sizes are always checked).
    """

    def __init__(self, path: str, verify: bool = True) -> None:
        self.path = path
        header = load_json(os.path.join(path, HEADER_FILE))
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"momoe: {path} is not a momoe token dataset (format {header.get('format')!r})")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"momoe: {path} has format version {header.get('version')!r}; this momoe reads "
                             f"version {FORMAT_VERSION}")
        try:
            self.vocab = Vocabulary.from_dict(header["vocab"])
            self.num_tokens = int(header["num_tokens"])
            num_documents = int(header["num_documents"])
            files = header["files"]
            self.metadata: Dict[str, Any] = dict(header.get("metadata", {}))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"momoe: {path}/{HEADER_FILE} is malformed ({error})") from None
        counts = {TOKENS_FILE: self.num_tokens, MODALITIES_FILE: self.num_tokens, OFFSETS_FILE: num_documents + 1}
        dtypes = {TOKENS_FILE: token_dtype(self.vocab), MODALITIES_FILE: np.dtype(np.uint8),
                  OFFSETS_FILE: np.dtype("<i8")}
        arrays = {name: self._map(name, files, counts[name], dtypes[name], verify) for name in counts}
        self.tokens, self.modalities, self.offsets = arrays[TOKENS_FILE], arrays[MODALITIES_FILE], arrays[OFFSETS_FILE]
        self.lengths = np.diff(self.offsets)
        if num_documents < 1 or self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens or (self.lengths <= 0).any():
            raise ValueError(f"momoe: {path}/{OFFSETS_FILE} is not a valid document index (it must rise strictly "
                             f"from 0 to {self.num_tokens} over {num_documents} documents)")
        if verify:
            self._verify_ids()

    def _map(self, name: str, files: Mapping[str, Any], count: int, dtype: np.dtype, verify: bool) -> np.ndarray:
        """Memory-map one file after checking it against its header entry."""
        file = os.path.join(self.path, name)
        spec = files.get(name)
        if not isinstance(spec, dict) or spec.get("dtype") != dtype.name or spec.get("count") != count:
            raise ValueError(f"momoe: {self.path}/{HEADER_FILE} describes {name} as {spec}, expected dtype "
                             f"{dtype.name} and {count} entries")
        if not os.path.isfile(file):
            raise ValueError(f"momoe: {file} is missing")
        size = os.path.getsize(file)
        if size != count * dtype.itemsize:
            raise ValueError(f"momoe: {file} has {size} bytes, the header says {count} x {dtype.itemsize} = "
                             f"{count * dtype.itemsize} (truncated or corrupt)")
        if verify and file_sha256(file) != spec.get("sha256"):
            raise ValueError(f"momoe: {file} does not match the checksum in its header (corrupt)")
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(file, dtype=dtype, mode="r", shape=(count,))

    def _verify_ids(self) -> None:
        for start in range(0, self.num_tokens, VERIFY_CHUNK):
            ids = np.asarray(self.tokens[start:start + VERIFY_CHUNK])
            if int(ids.max()) >= self.vocab.size:
                raise ValueError(f"momoe: {self.path}/{TOKENS_FILE} has token id {int(ids.max())} outside the "
                                 f"vocabulary [0, {self.vocab.size})")
            mismatch = np.flatnonzero(modality_lookup(self.vocab, ids) != self.modalities[start:start + VERIFY_CHUNK])
            if mismatch.size:
                at = start + int(mismatch[0])
                raise ValueError(f"momoe: {self.path}/{MODALITIES_FILE}: modality id {int(self.modalities[at])} at "
                                 f"token {at} is inconsistent with the vocabulary ranges (token id "
                                 f"{int(self.tokens[at])})")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"momoe: document {index} out of range for {len(self)} documents")
        index %= len(self)
        start, stop = self.offsets[index], self.offsets[index + 1]
        return (torch.from_numpy(self.tokens[start:stop].astype(np.int64)),
                torch.from_numpy(self.modalities[start:stop].astype(np.int64)))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self)))

    def check_vocab(self, vocab: Vocabulary) -> None:
        """Raise ValueError unless this dataset was written with `vocab` (e.g. a tokenizer's)."""
        if vocab != self.vocab:
            raise ValueError(f"momoe: {self.path} was tokenized with another vocabulary: "
                             f"{list(self.vocab.describe())} != {list(vocab.describe())}")

    def tokens_per_modality(self) -> Dict[str, int]:
        counts = np.bincount(np.asarray(self.modalities), minlength=len(self.vocab.modalities))
        return {name: int(c) for name, c in zip(self.vocab.names, counts)}
