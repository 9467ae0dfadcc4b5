"""Byte-level text: exact round trips."""
import pytest
import torch

from momoe.data.tokenizers import ByteTokenizer


@pytest.mark.parametrize("text", ["", "a handwritten seven", "Ünïcödé ✓ 数字 7 🙂", "tabs\tand\nnewlines\x00"],
                         ids=["empty", "ascii", "unicode", "control"])
def test_exact_round_trip(text):
    tok = ByteTokenizer()
    codes = tok.encode(text)
    assert codes.dtype == torch.long and codes.shape == (len(text.encode("utf-8")),)
    assert tok.decode(codes) == text


def test_invalid_utf8_and_bad_inputs():
    tok = ByteTokenizer()
    assert tok.decode(torch.tensor([104, 0xFF, 105])) == "h\ufffdi"
    with pytest.raises(ValueError, match=r"bytes in \[0, 256\)"):
        tok.decode(torch.tensor([256]))
    with pytest.raises(ValueError, match="text payloads are str"):
        tok.encode(b"bytes")
