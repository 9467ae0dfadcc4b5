"""Images as discrete codes: a vector-quantised patch codebook.

An image `[H, W]` with values in [0, 1] is cut into non-overlapping `p x p` patches in raster order;
each patch becomes the index of its nearest codebook vector (K-means over the training patches).
Decoding puts the codebook vectors back in place, so the reconstruction error is the quantisation
error of the codebook.

Shape legend: N images, H x W pixels, p patch size, P = (H/p)(W/p) patches, K codes.
"""
from typing import Any, Dict, Tuple

import torch

from momoe.data.tokenizers.kmeans import kmeans, nearest


class PatchTokenizer:
    """image `[H, W]` in [0, 1] <-> `[P]` codes in [0, K).

    Args:
        codebook (Tensor): `[K, p*p]` patch vectors; patch_size (int): p;
        image_size (tuple): (H, W), multiples of p (every image of a tokenizer has this size).
    """

    name = "image"

    def __init__(self, codebook: torch.Tensor, patch_size: int, image_size: Tuple[int, int]) -> None:
        height, width = image_size
        if patch_size <= 0 or height % patch_size or width % patch_size:
            raise ValueError(f"momoe: image size {tuple(image_size)} must be a multiple of the patch size {patch_size}")
        if codebook.dim() != 2 or codebook.shape[1] != patch_size * patch_size:
            raise ValueError(f"momoe: codebook must have shape (K, {patch_size * patch_size}), got {tuple(codebook.shape)}")
        self.codebook = codebook.float()
        self.patch_size = patch_size
        self.image_size = (height, width)

    @classmethod
    def train(cls, images: torch.Tensor, patch_size: int, num_codes: int, iters: int = 25,
              seed: int = 0) -> "PatchTokenizer":
        """K-means codebook over every patch of images `[N, H, W]` (values in [0, 1])."""
        if images.dim() != 3:
            raise ValueError(f"momoe: training images must have shape (N, H, W), got {tuple(images.shape)}")
        tokenizer = cls(torch.zeros(1, patch_size * patch_size), patch_size, tuple(images.shape[1:]))
        patches = tokenizer.patches(images).reshape(-1, patch_size * patch_size)
        tokenizer.codebook = kmeans(patches, num_codes, iters=iters, seed=seed)
        return tokenizer

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def codes_per_image(self) -> int:
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """images (Tensor): `[..., H, W]`. Returns `[..., P, p*p]` patches in raster order."""
        if tuple(images.shape[-2:]) != self.image_size or not images.is_floating_point():
            raise ValueError(f"momoe: images must be float of size {self.image_size}, got {images.dtype} "
                             f"{tuple(images.shape)}")
        p = self.patch_size
        h, w = self.image_size[0] // p, self.image_size[1] // p
        x = images.float().reshape(*images.shape[:-2], h, p, w, p).transpose(-3, -2)
        return x.reshape(*images.shape[:-2], h * w, p * p)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image (Tensor): `[H, W]` in [0, 1]. Returns `[P]` codes (int64)."""
        if image.dim() != 2:
            raise ValueError(f"momoe: encode takes one image of shape (H, W), got {tuple(image.shape)}")
        return nearest(self.patches(image), self.codebook)[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (Tensor): `[P]` in [0, K). Returns the image `[H, W]` (float32)."""
        if codes.shape != (self.codes_per_image,):
            raise ValueError(f"momoe: an image is {self.codes_per_image} codes, got shape {tuple(codes.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.num_codes:
            raise ValueError(f"momoe: image codes must be in [0, {self.num_codes})")
        p = self.patch_size
        h, w = self.image_size[0] // p, self.image_size[1] // p
        x = self.codebook[codes].reshape(h, w, p, p).transpose(1, 2)
        return x.reshape(self.image_size)

    # ------------------------------------------------------------------ state
    def config(self) -> Dict[str, Any]:
        return {"patch_size": self.patch_size, "image_size": list(self.image_size), "num_codes": self.num_codes}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"codebook": self.codebook}

    @classmethod
    def from_state(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "PatchTokenizer":
        tokenizer = cls(tensors["codebook"], int(config["patch_size"]), tuple(config["image_size"]))
        if tokenizer.num_codes != int(config["num_codes"]):
            raise ValueError(f"momoe: image codebook has {tokenizer.num_codes} codes, its config says {config['num_codes']}")
        return tokenizer
