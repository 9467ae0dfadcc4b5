"""Text as bytes: UTF-8, one code per byte (exact round trip for any string).

Shape legend: T bytes.
"""
from typing import Any, Dict

import torch


class ByteTokenizer:
    """str <-> `[T]` codes in [0, 256) (the UTF-8 bytes)."""

    name = "text"
    num_codes = 256

    def encode(self, text: str) -> torch.Tensor:
        """text (str). Returns `[T]` int64 byte values."""
        if not isinstance(text, str):
            raise ValueError(f"momoe: text payloads are str, got {type(text).__name__}")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, codes: torch.Tensor) -> str:
        """codes (Tensor): `[T]` in [0, 256). Invalid UTF-8 (possible in generated text) decodes to U+FFFD."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"momoe: text codes must be bytes in [0, {self.num_codes})")
        return bytes(codes.tolist()).decode("utf-8", errors="replace")

    def config(self) -> Dict[str, Any]:
        return {"encoding": "utf-8"}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_state(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "ByteTokenizer":
        if config.get("encoding") != "utf-8" or tensors:
            raise ValueError(f"momoe: unsupported text tokenizer state {config}")
        return cls()
