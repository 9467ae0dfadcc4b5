"""Greyscale PNG files with the standard library only (zlib + the PNG chunk layout), so generated images
are written without optional dependencies.

Writing: 8-bit greyscale. Reading: 8-bit greyscale, grey+alpha, RGB or RGBA, not interlaced (what
image editors and matplotlib write); colour is converted to grey (ITU-R 601 luma), alpha ignored.

Shape legend: H x W pixels, C channels.
"""
import struct
import zlib

import numpy as np
import torch

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # PNG colour type -> channels
LUMA = np.array([0.299, 0.587, 0.114])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: str, image: torch.Tensor, scale: int = 1) -> None:
    """image (Tensor): `[H, W]` with values in [0, 1] (clipped), each pixel drawn as scale x scale."""
    if image.dim() != 2 or not image.is_floating_point() or scale < 1:
        raise ValueError(f"momoe: write_png takes a float image of shape (H, W) and scale >= 1, got "
                         f"{image.dtype} {tuple(image.shape)}, scale {scale}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
    height, width = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
                + _chunk(b"IEND", b""))


def _unfilter(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """Undo the per-row PNG filters (none, sub, up, average, Paeth). Returns `[H, W * C]` uint8."""
    stride = width * channels
    rows = np.frombuffer(data, np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.int32)
    previous = np.zeros(stride, np.int32)
    for y in range(height):
        kind, row = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind in (0, 2):
            line = (row + (previous if kind == 2 else 0)) & 0xFF
        elif kind in (1, 3, 4):
            line = np.zeros(stride, np.int32)
            for x in range(stride):
                left = line[x - channels] if x >= channels else 0
                up, corner = previous[x], previous[x - channels] if x >= channels else 0
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + up) // 2
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[x] = (row[x] + predictor) & 0xFF
        else:
            raise ValueError(f"momoe: unknown PNG filter type {kind}")
        out[y] = previous = line
    return out.astype(np.uint8)


def read_png(path: str) -> torch.Tensor:
    """Read a PNG as a greyscale image `[H, W]` in [0, 1] (float32)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(SIGNATURE):
        raise ValueError(f"momoe: {path} is not a PNG file")
    pos, kind, header, idat = len(SIGNATURE), b"", None, []
    while kind != b"IEND":
        if pos + 8 > len(data):
            raise ValueError(f"momoe: {path} is truncated or corrupt (it ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise ValueError(f"momoe: {path} is truncated or corrupt (chunk {kind!r})")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    if header is None or not idat:
        raise ValueError(f"momoe: {path} has no image header or data")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in CHANNELS or interlace:
        raise ValueError(f"momoe: {path}: only 8-bit, non-interlaced greyscale/RGB(A) PNGs are read (bit depth "
                         f"{depth}, colour type {colour}, interlace {interlace})")
    channels = CHANNELS[colour]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as error:
        raise ValueError(f"momoe: {path} has corrupt image data ({error})") from None
    if len(raw) != height * (width * channels + 1):
        raise ValueError(f"momoe: {path} has {len(raw)} bytes of image data, expected "
                         f"{height * (width * channels + 1)}")
    pixels = _unfilter(raw, height, width, channels).reshape(height, width, channels).astype(np.float64)
    grey = pixels[..., 0] if channels < 3 else pixels[..., :3] @ LUMA
    return torch.from_numpy(grey / 255).float()
