"""Where datasets come from: the embedded one shipped in the package, or a folder on disk.

A dataset root holds one token dataset per split and the tokenizer that wrote them:

```
<root>/train/        header.json tokens.bin modalities.bin offsets.bin   (momoe.data.format)
<root>/validation/   the same
<root>/tokenizer/    tokenizer.json tokenizer.safetensors                (MultimodalTokenizer.save)
```

The embedded root is momoe/data/builtin/ (written by scripts/make_dataset.py): scikit-learn's 8x8
digits, short texts describing them and speech of those texts, interleaved in varied orders.
"""
import os

from momoe.data.format import HEADER_FILE, TokenDataset
from momoe.data.tokenizers.multimodal import MultimodalTokenizer

BUILTIN = "builtin"
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILTIN)
SPLITS = ("train", "validation")
TOKENIZER_DIR = "tokenizer"


def dataset_root(source: str) -> str:
    """'builtin' -> the embedded root; anything else is a path."""
    return BUILTIN_DIR if source == BUILTIN else source


def load_dataset(source: str = BUILTIN, split: str = "train", verify: bool = True) -> TokenDataset:
    """Open a split: source is 'builtin', a dataset root (its `split` subfolder is read) or a single
    dataset folder (holding header.json; `split` is then ignored)."""
    root = dataset_root(source)
    if os.path.isfile(os.path.join(root, HEADER_FILE)):
        return TokenDataset(root, verify=verify)
    if split not in SPLITS:
        raise ValueError(f"momoe: unknown split {split!r}; splits are {list(SPLITS)}")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise ValueError(f"momoe: {source!r} has no {split!r} split (no folder {path})")
    return TokenDataset(path, verify=verify)


def load_tokenizer(source: str = BUILTIN) -> MultimodalTokenizer:
    """The tokenizer of a dataset root ('builtin' or a path): decodes its token ids back to text,
    images and speech."""
    return MultimodalTokenizer.load(os.path.join(dataset_root(source), TOKENIZER_DIR))


def load_builtin(split: str = "train", verify: bool = True) -> TokenDataset:
    """The embedded tri-modal dataset's `split` ('train' or 'validation'); no network, no system packages."""
    return load_dataset(BUILTIN, split, verify=verify)
