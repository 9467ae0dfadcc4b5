"""The stdlib PNG writer and reader."""
import struct
import zlib

import pytest
import torch

from momoe.train.png import SIGNATURE, _chunk, read_png, write_png


def test_round_trip_and_scale(tmp_path):
    image = torch.rand(5, 7)
    path = str(tmp_path / "a.png")
    write_png(path, image)
    assert torch.allclose(read_png(path), image, atol=0.5 / 255)
    write_png(path, image, scale=3)
    big = read_png(path)
    assert big.shape == (15, 21)
    assert torch.equal(big[::3, ::3], read_png(path)[1::3, 1::3])


def write_rgb_with_filters(path, pixels):
    """An RGB PNG whose rows use filter types 0..4 in turn (as other encoders write them)."""
    height, width, _ = pixels.shape
    raw, previous = b"", [0] * (width * 3)
    for y in range(height):
        kind, row = y % 5, pixels[y].flatten().tolist()
        encoded = []
        for x, value in enumerate(row):
            left = row[x - 3] if x >= 3 else 0
            up, corner = previous[x], previous[x - 3] if x >= 3 else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            paeth = left if pa <= min(pb, pc) else (up if pb <= pc else corner)
            predictor = (0, left, up, (left + up) // 2, paeth)[kind]
            encoded.append((value - predictor) % 256)
        raw += bytes([kind] + encoded)
        previous = row
    with open(path, "wb") as f:
        f.write(SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def test_reads_rgb_with_every_filter(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (10, 6, 3), generator=gen)
    path = str(tmp_path / "rgb.png")
    write_rgb_with_filters(path, pixels)
    expected = (pixels.double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)) / 255
    assert torch.allclose(read_png(path), expected.float(), atol=1e-6)


def test_bad_files(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(str(path))
    write_png(str(path), torch.rand(4, 4))
    data = path.read_bytes()
    path.write_bytes(data[:40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_png(str(path))
    with pytest.raises(ValueError, match="shape"):
        write_png(str(path), torch.rand(2, 2, 2))
