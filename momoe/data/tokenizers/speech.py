"""Speech as discrete units: clustered spectral frames, decoded approximately back to audio.

Encoding: magnitude STFT (Hann window of n_fft samples, hop_length apart), averaged over groups of
`frames_per_unit` frames (one unit per group: 22050 Hz, hop 220, 4 frames -> ~25 units per second),
log-mel features of each group, nearest K-means centroid -> unit id. Decoding: each unit's mean
linear magnitude spectrum (averaged over the training groups assigned to it) repeated over its
frames, then Griffin-Lim for the phase. The result is intelligible-ish, not natural speech: the
units keep the spectral envelope, Griffin-Lim invents the phase.

Shape legend: S samples, F = n_fft // 2 + 1 bins, T frames, U units, M mel bands, K units in the codebook.
"""
from typing import Any, Dict, Sequence

import torch

from momoe.data.tokenizers.audio import griffin_lim, magnitude_stft, mel_filterbank
from momoe.data.tokenizers.kmeans import kmeans, nearest

LOG_FLOOR = 1e-5


class SpeechTokenizer:
    """waveform `[S]` (float in [-1, 1] at `sample_rate`) <-> `[U]` units in [0, K).

    Args:
        centroids (Tensor): `[K, M]` log-mel centroids (what encode compares against);
        spectra (Tensor): `[K, F]` mean magnitude spectrum of each unit (what decode plays).
    """

    name = "speech"

    def __init__(self, centroids: torch.Tensor, spectra: torch.Tensor, sample_rate: int, n_fft: int,
                 hop_length: int, frames_per_unit: int, griffin_lim_iters: int = 32) -> None:
        if centroids.dim() != 2 or spectra.shape != (centroids.shape[0], n_fft // 2 + 1):
            raise ValueError(f"momoe: speech centroids (K, M) and spectra (K, {n_fft // 2 + 1}) do not match: "
                             f"{tuple(centroids.shape)} and {tuple(spectra.shape)}")
        if min(sample_rate, n_fft, hop_length, frames_per_unit, griffin_lim_iters) <= 0:
            raise ValueError("momoe: speech tokenizer sizes must be positive")
        self.centroids = centroids.float()
        self.spectra = spectra.float()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.frames_per_unit = frames_per_unit
        self.griffin_lim_iters = griffin_lim_iters
        self.mel = mel_filterbank(n_fft // 2 + 1, centroids.shape[1], sample_rate)

    @classmethod
    def train(cls, waveforms: Sequence[torch.Tensor], sample_rate: int, num_units: int, n_fft: int = 1024,
              hop_length: int = 220, frames_per_unit: int = 4, n_mels: int = 40, iters: int = 25,
              seed: int = 0) -> "SpeechTokenizer":
        """K-means over the log-mel unit features of every waveform `[S_i]`; each unit's decoding
        spectrum is the mean magnitude of the training groups assigned to it (silence if none)."""
        bins = n_fft // 2 + 1
        tokenizer = cls(torch.zeros(1, n_mels), torch.zeros(1, bins), sample_rate, n_fft, hop_length, frames_per_unit)
        grouped = [tokenizer.unit_spectra(w) for w in waveforms]
        magnitude = torch.cat(grouped)
        features = tokenizer.features(magnitude)
        centroids = kmeans(features, num_units, iters=iters, seed=seed)
        assign = nearest(features, centroids)[0]
        counts = torch.bincount(assign, minlength=num_units).clamp_min(1)
        spectra = torch.zeros(num_units, bins).index_add_(0, assign, magnitude) / counts[:, None]
        return cls(centroids, spectra, sample_rate, n_fft, hop_length, frames_per_unit)

    @property
    def num_codes(self) -> int:
        return self.centroids.shape[0]

    def unit_spectra(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (Tensor): `[S]`. Returns `[U, F]`: the magnitude spectrum averaged over each group of
        frames_per_unit frames, U = ceil(T / frames_per_unit) (the last group padded with silence)."""
        if waveform.dim() != 1 or not waveform.is_floating_point() or waveform.numel() == 0:
            raise ValueError(f"momoe: a waveform is a non-empty float tensor of shape (S,), got {waveform.dtype} "
                             f"{tuple(waveform.shape)}")
        magnitude = magnitude_stft(waveform, self.n_fft, self.hop_length)  # [F, T]
        pad = -magnitude.shape[1] % self.frames_per_unit
        magnitude = torch.nn.functional.pad(magnitude, (0, pad))
        return magnitude.T.reshape(-1, self.frames_per_unit, magnitude.shape[0]).mean(1)

    def features(self, unit_spectra: torch.Tensor) -> torch.Tensor:
        """unit_spectra (Tensor): `[U, F]` magnitudes. Returns `[U, M]` log-mel features."""
        return torch.log(unit_spectra @ self.mel + LOG_FLOOR)

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (Tensor): `[S]` at self.sample_rate. Returns `[U]` units (int64)."""
        return nearest(self.features(self.unit_spectra(waveform)), self.centroids)[0]

    def spectrogram(self, units: torch.Tensor) -> torch.Tensor:
        """units (Tensor): `[U]` in [0, K). Returns the magnitude spectrogram `[F, U * frames_per_unit]`."""
        if units.dim() != 1 or units.numel() == 0:
            raise ValueError(f"momoe: speech units must be a non-empty (U,) tensor, got {tuple(units.shape)}")
        if int(units.min()) < 0 or int(units.max()) >= self.num_codes:
            raise ValueError(f"momoe: speech units must be in [0, {self.num_codes})")
        return self.spectra[units].repeat_interleave(self.frames_per_unit, dim=0).T

    def decode(self, units: torch.Tensor) -> torch.Tensor:
        """units (Tensor): `[U]`. Returns a waveform `[S]`, S = (U * frames_per_unit - 1) * hop_length."""
        return griffin_lim(self.spectrogram(units), self.n_fft, self.hop_length, iters=self.griffin_lim_iters)

    # ------------------------------------------------------------------ state
    def config(self) -> Dict[str, Any]:
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "frames_per_unit": self.frames_per_unit, "n_mels": self.centroids.shape[1],
                "num_codes": self.num_codes, "griffin_lim_iters": self.griffin_lim_iters}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"centroids": self.centroids, "spectra": self.spectra}

    @classmethod
    def from_state(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "SpeechTokenizer":
        tokenizer = cls(tensors["centroids"], tensors["spectra"], int(config["sample_rate"]), int(config["n_fft"]),
                        int(config["hop_length"]), int(config["frames_per_unit"]), int(config["griffin_lim_iters"]))
        if tokenizer.num_codes != int(config["num_codes"]) or tokenizer.centroids.shape[1] != int(config["n_mels"]):
            raise ValueError(f"momoe: speech tensors {tuple(tokenizer.centroids.shape)} do not match the config {config}")
        return tokenizer
