"""Audio helpers for the speech tokenizer: 16-bit PCM WAV files (stdlib `wave`), magnitude STFT,
a mel filterbank and Griffin-Lim phase reconstruction.

Shape legend: S samples, F = n_fft // 2 + 1 frequency bins, T frames, M mel bands.
"""
import math
import wave

import torch


def write_wav(path: str, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write waveform `[S]` (float, clipped to [-1, 1]) as mono 16-bit PCM."""
    if waveform.dim() != 1 or not waveform.is_floating_point():
        raise ValueError(f"momoe: a waveform is a float tensor of shape (S,), got {waveform.dtype} {tuple(waveform.shape)}")
    pcm = (waveform.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.numpy().astype("<i2").tobytes())


def read_wav(path: str) -> "tuple[torch.Tensor, int]":
    """Read a mono 16-bit PCM WAV file. Returns the waveform `[S]` in [-1, 1] (float32) and its sample rate."""
    try:
        with wave.open(path, "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(frames)
    except (wave.Error, EOFError) as error:
        raise ValueError(f"momoe: {path} is not a readable WAV file ({error})") from None
    if channels != 1 or width != 2:
        raise ValueError(f"momoe: {path} must be mono 16-bit PCM, got {channels} channels of {8 * width} bits")
    pcm = torch.frombuffer(bytearray(data), dtype=torch.int16)
    return pcm.float() / 32768, rate


def magnitude_stft(waveform: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """waveform (Tensor): `[S]`. Returns the magnitude spectrogram `[F, T]` with T = 1 + S // hop_length
    (Hann window of n_fft samples, centred frames)."""
    window = torch.hann_window(n_fft, device=waveform.device)
    spec = torch.stft(waveform.float(), n_fft, hop_length, window=window, center=True, return_complex=True)
    return spec.abs()


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters equally spaced on the HTK mel scale, 2595 log10(1 + f / 700), from 0 Hz to
    the Nyquist frequency. Returns `[F, M]` (multiply a `[T, F]` power or magnitude spectrum by it)."""
    def mel(f: torch.Tensor) -> torch.Tensor:
        return 2595 * torch.log10(1 + f / 700)

    nyquist = torch.tensor(sample_rate / 2.0, dtype=torch.float64)
    edges_mel = torch.linspace(0, float(mel(nyquist)), n_mels + 2, dtype=torch.float64)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    freqs = torch.linspace(0, float(nyquist), n_freqs, dtype=torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


def griffin_lim(magnitude: torch.Tensor, n_fft: int, hop_length: int, iters: int = 32, momentum: float = 0.99,
                seed: int = 0) -> torch.Tensor:
    """A waveform whose STFT magnitude approximates `magnitude` `[F, T]`: alternating projections
    (Griffin & Lim, 1984) with the momentum of the fast variant (Perraudin et al., 2013), starting
    from random phases drawn with `seed`. Returns `[S]` with S = (T - 1) * hop_length."""
    if magnitude.dim() != 2 or magnitude.shape[0] != n_fft // 2 + 1:
        raise ValueError(f"momoe: magnitude must have shape ({n_fft // 2 + 1}, T), got {tuple(magnitude.shape)}")
    window = torch.hann_window(n_fft, device=magnitude.device)
    length = (magnitude.shape[1] - 1) * hop_length
    generator = torch.Generator().manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=generator) * 2 * math.pi
    angles = torch.polar(torch.ones_like(magnitude), phase.to(magnitude.device))
    previous = torch.zeros_like(angles)

    def istft(a: torch.Tensor) -> torch.Tensor:
        return torch.istft(magnitude * a, n_fft, hop_length, window=window, center=True, length=length)

    for _ in range(iters):
        rebuilt = torch.stft(istft(angles), n_fft, hop_length, window=window, center=True, return_complex=True)
        angles = rebuilt - previous * (momentum / (1 + momentum))
        angles = angles / angles.abs().clamp_min(1e-8)
        previous = rebuilt
    return istft(angles)
