"""VQ patch codebook: exact where the codebook holds every patch, bounded error otherwise."""
import pytest
import torch

from momoe.data import load_tokenizer
from momoe.data.tokenizers import PatchTokenizer, nearest


def blocky_images(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 8, 8] images in [0, 1]: a few random bright rectangles on a dark background, like strokes."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 8, 8)
    for image in images:
        for _ in range(3):
            r, c = torch.randint(0, 7, (2,), generator=gen).tolist()
            h, w = torch.randint(1, 4, (2,), generator=gen).tolist()
            image[r:r + h, c:c + w] += 0.5 * torch.rand(1, generator=gen)
    return images.clamp(0, 1)


def test_exact_when_every_patch_is_a_code():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 3, (20, 4, 4), generator=gen).float().div(2)
    images = images.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2x2 patches of 3 grey levels
    tok = PatchTokenizer.train(images, patch_size=2, num_codes=3)
    for image in images:
        codes = tok.encode(image)
        assert codes.shape == (16,) and tok.decode(codes).shape == (8, 8)
        assert torch.equal(tok.decode(codes), image)


def test_bounded_reconstruction_error():
    train, test = blocky_images(300, seed=0), blocky_images(50, seed=1)
    tok = PatchTokenizer.train(train, patch_size=2, num_codes=64)
    recon = torch.stack([tok.decode(tok.encode(x)) for x in test])
    error = (recon - test).abs().mean()
    baseline = (test - train.mean()).abs().mean()  # a one-code tokenizer's error, roughly
    assert error < 0.05 and error < baseline / 3, (float(error), float(baseline))


def test_builtin_codebook_on_the_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    images = torch.from_numpy(datasets.load_digits().images).float() / 16
    tok = load_tokenizer("builtin").tokenizer("image")
    codes = nearest(tok.patches(images).reshape(-1, 4), tok.codebook)[0].reshape(len(images), 16)  # batched encode
    assert torch.equal(codes[:5], torch.stack([tok.encode(x) for x in images[:5]]))
    recon = torch.stack([tok.decode(c) for c in codes])
    assert float((recon - images).abs().mean()) < 0.05


def test_bad_inputs():
    tok = PatchTokenizer(torch.rand(4, 4), patch_size=2, image_size=(8, 8))
    with pytest.raises(ValueError, match=r"must be float of size \(8, 8\)"):
        tok.encode(torch.rand(6, 8))
    with pytest.raises(ValueError, match="an image is 16 codes"):
        tok.decode(torch.zeros(15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image codes must be in \[0, 4\)"):
        tok.decode(torch.full((16,), 4))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        PatchTokenizer(torch.rand(4, 9), patch_size=3, image_size=(8, 8))
    with pytest.raises(ValueError, match=r"codebook must have shape \(K, 4\)"):
        PatchTokenizer(torch.rand(4, 9), patch_size=2, image_size=(8, 8))
