"""Tokenizers of the interleaved stream: bytes for text, a VQ patch codebook for images, clustered
spectral frames for speech, and MultimodalTokenizer that puts them behind one vocabulary."""
from momoe.data.tokenizers.audio import read_wav, write_wav
from momoe.data.tokenizers.image import PatchTokenizer
from momoe.data.tokenizers.kmeans import kmeans, nearest
from momoe.data.tokenizers.multimodal import Document, MultimodalTokenizer
from momoe.data.tokenizers.speech import SpeechTokenizer
from momoe.data.tokenizers.text import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Document",
    "MultimodalTokenizer",
    "PatchTokenizer",
    "SpeechTokenizer",
    "kmeans",
    "nearest",
    "read_wav",
    "write_wav",
]
