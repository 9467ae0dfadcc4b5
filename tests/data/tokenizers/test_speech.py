"""Speech units: shapes, bounded spectral error of the unit spectra, Griffin-Lim decoding, WAV files."""
import math

import pytest
import torch

from momoe.data.tokenizers import SpeechTokenizer, read_wav, write_wav
from momoe.data.tokenizers.audio import magnitude_stft

RATE = 8000
TONES = (0.0, 300.0, 700.0, 1500.0, 3000.0)  # 0: silence


def tone_sequence(segments: int, seed: int) -> torch.Tensor:
    """[S] waveform: `segments` pieces of 0.1 s, each a random tone (or silence) with its first harmonic."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(0.1 * RATE)) / RATE
    pieces = []
    for _ in range(segments):
        f = TONES[int(torch.randint(len(TONES), (1,), generator=gen))]
        pieces.append(0.5 * torch.sin(2 * math.pi * f * t) + 0.2 * torch.sin(4 * math.pi * f * t))
    return torch.cat(pieces) + 1e-3 * torch.randn(len(pieces) * len(t), generator=gen)


@pytest.fixture(scope="module")
def tokenizer():
    waves = [tone_sequence(12, seed) for seed in range(8)]
    return SpeechTokenizer.train(waves, RATE, num_units=12, n_fft=256, hop_length=80, frames_per_unit=2, n_mels=24)


def test_shapes(tokenizer):
    wave = tone_sequence(7, seed=100)
    units = tokenizer.encode(wave)
    frames = 1 + wave.numel() // tokenizer.hop_length
    assert units.dtype == torch.long and units.shape == (math.ceil(frames / 2),)
    assert tokenizer.spectrogram(units).shape == (129, 2 * units.numel())
    assert tokenizer.decode(units).shape == ((2 * units.numel() - 1) * tokenizer.hop_length,)


def test_unit_spectra_have_bounded_error(tokenizer):
    """The spectra the units decode to are close to the input's (log magnitude), far closer than one
    average spectrum for everything."""
    wave = tone_sequence(10, seed=101)
    target = torch.log(tokenizer.unit_spectra(wave) + 1e-2)
    decoded = torch.log(tokenizer.spectra[tokenizer.encode(wave)] + 1e-2)
    error = (target - decoded).square().mean().sqrt()
    baseline = (target - torch.log(tokenizer.spectra.mean(0) + 1e-2)).square().mean().sqrt()
    assert error < 0.35 * baseline, (float(error), float(baseline))


def test_griffin_lim_matches_the_spectrogram(tokenizer):
    units = tokenizer.encode(tone_sequence(6, seed=102))
    target = tokenizer.spectrogram(units)
    wave = tokenizer.decode(units)
    got = magnitude_stft(wave, tokenizer.n_fft, tokenizer.hop_length)[:, :target.shape[1]]
    convergence = (got - target).norm() / target.norm()
    assert convergence < 0.35, float(convergence)


def test_wav_round_trip(tmp_path):
    wave = tone_sequence(3, seed=5)
    write_wav(str(tmp_path / "a.wav"), wave, RATE)
    got, rate = read_wav(str(tmp_path / "a.wav"))
    assert rate == RATE and got.shape == wave.shape
    assert float((got - wave).abs().max()) < 1e-4
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="not a readable WAV file"):
        read_wav(str(tmp_path / "bad.wav"))
    with pytest.raises(ValueError, match=r"float tensor of shape \(S,\)"):
        write_wav(str(tmp_path / "b.wav"), torch.zeros(2, 10), RATE)


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match=r"speech units must be in \[0, 12\)"):
        tokenizer.decode(torch.tensor([12]))
    with pytest.raises(ValueError, match="non-empty float tensor"):
        tokenizer.encode(torch.zeros(0))
    with pytest.raises(ValueError, match="do not match"):
        SpeechTokenizer(torch.zeros(4, 24), torch.zeros(4, 100), RATE, 256, 80, 2)
