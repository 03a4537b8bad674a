"""Audio towers: a log-mel front end, an audio transformer or a timm model over the spectrogram.

Front end (defaults follow LAION-CLAP at 48 kHz: window 1024, hop 480, 64 mel bins, 50-14,000 Hz):
``torch.stft`` with a periodic Hann window (``center=True``, reflect padding) -> power spectrogram
-> mel filterbank -> decibels. The filterbank uses the **Slaney** mel scale and Slaney area
normalisation by default (what librosa and torchlibrosa, hence CLAP, use); ``mel_scale="htk"``
and ``norm=None`` give the HTK variant (``2595 * log10(1 + f / 700)``, peak height 1).

Crop policy (long audio):

- training: the data pipeline calls :func:`random_crop` to cut each waveform to ``clip_samples``
  (zero-padding short ones), so batches have a fixed shape and the randomness comes from the
  loader's seeded generator. The tower encodes whatever it is given.
- evaluation: the eval transform (``clip_train.data.signal_transforms``) keeps the whole clip and
  cuts it into at most ``max_eval_crops`` evenly spaced ``clip_samples`` crops covering it
  (:func:`eval_crop_starts`: the first at 0, the last ending at the clip's end; a clip no longer than
  ``clip_samples`` is one zero-padded crop). :func:`pack_eval_crops` lays them out as one
  fixed-shape tensor so clips of any length batch with torch's default collate:

  ``(max_eval_crops, clip_samples + 1)``: row ``i`` is crop ``i`` (samples in ``[:, :clip_samples]``)
  followed by a flag in the last column, ``1.0`` for a real crop and ``0.0`` for a padding row (all
  zeros). Real crops come first. The flag is exact in any float dtype (bf16 included), and no
  NaN sentinel is involved.

  The tower recognises this layout by its rank: a ``(B, max_eval_crops, clip_samples + 1)`` input
  (in either mode) is encoded crop by crop, real crops only, and the result is the **mean of the
  real crops' features** (tower features, before the dual encoder's bias-free linear projection,
  so it equals the mean of the projected crop embeddings too; normalisation, where asked for,
  comes after the mean). In eval mode the tower does the same to a raw ``(B, samples)`` input longer
  than ``clip_samples`` (crops at ``eval_crop_starts(samples, clip_samples, max_eval_crops)``), so
  the packed and the raw path agree.
"""
from __future__ import annotations

import math

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .towers import TOWERS, SignalTower, construct

# ---------------------------------------------------------------- mel filterbank


def hz_to_mel(freq, mel_scale: str = "slaney"):
    """Hz -> mel. HTK: ``2595 log10(1 + f/700)``. Slaney: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', not {mel_scale!r}")
    linear = freq / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(freq >= 1000.0, log_part, linear)


def mel_to_hz(mel, mel_scale: str = "slaney"):
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', not {mel_scale!r}")
    return np.where(mel >= 15.0, 1000.0 * np.exp((mel - 15.0) * (math.log(6.4) / 27.0)), mel * (200.0 / 3))


def mel_edges(n_mels: int, f_min: float, f_max: float, mel_scale: str = "slaney") -> np.ndarray:
    """The ``n_mels + 2`` band edges in Hz, equally spaced in mel; filter i peaks at edge i + 1."""
    mels = np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2)
    edges = mel_to_hz(mels, mel_scale)
    edges[0], edges[-1] = f_min, f_max  # exact, not off by the round trip's rounding
    return edges


def mel_filterbank(freqs, n_mels: int, f_min: float, f_max: float, mel_scale: str = "slaney",
                   norm: str | None = "slaney") -> np.ndarray:
    """Triangular filters ``(n_mels, len(freqs))`` evaluated at ``freqs`` (Hz).

    Filter i rises linearly from edge i to 1 at edge i+1 and falls to 0 at edge i+2.
    ``norm="slaney"`` divides each by half its bandwidth so all have the same area.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    edges = mel_edges(n_mels, f_min, f_max, mel_scale)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if norm == "slaney":
        weights *= 2.0 / (upper - lower)
    elif norm is not None:
        raise ValueError(f"norm must be 'slaney' or None, not {norm!r}")
    return weights


class LogMelSpectrogram(nn.Module):
    """``(B, samples)`` float waveforms -> ``(B, n_mels, 1 + samples // hop_length)`` log-mel (dB).

    ``10 * log10(max(mel_power, log_offset))``; with ``top_db`` each record is also clamped to at
    most ``top_db`` below its maximum. Computed in float32 whatever the module's dtype.
    """

    def __init__(self, sample_rate: int = 48000, n_fft: int = 1024, win_length: int | None = None,
                 hop_length: int = 480, n_mels: int = 64, f_min: float = 50.0, f_max: float | None = 14000.0,
                 mel_scale: str = "slaney", norm: str | None = "slaney", log_offset: float = 1e-10,
                 top_db: float | None = None):
        super().__init__()
        win_length = win_length or n_fft
        f_max = f_max or sample_rate / 2
        if not 0 <= f_min < f_max <= sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2; got {f_min}, {f_max}, {sample_rate}")
        if win_length > n_fft:
            raise ValueError(f"win_length {win_length} exceeds n_fft {n_fft}")
        self.sample_rate, self.n_fft, self.win_length, self.hop_length = sample_rate, n_fft, win_length, hop_length
        self.n_mels, self.log_offset, self.top_db = n_mels, log_offset, top_db
        freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
        fb = mel_filterbank(freqs, n_mels, f_min, f_max, mel_scale, norm)
        # Derived from the config, so not saved with the weights (non-persistent buffers).
        self.register_buffer("mel_fb", torch.tensor(fb, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)

    def num_frames(self, samples: int) -> int:
        return 1 + samples // self.hop_length

    def power_spectrogram(self, wave: torch.Tensor) -> torch.Tensor:
        """``|STFT|^2``: ``(B, n_fft // 2 + 1, frames)``."""
        dtype = torch.float64 if wave.dtype == torch.float64 else torch.float32
        spec = torch.stft(wave.to(dtype), self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window.to(dtype), center=True, pad_mode="reflect", return_complex=True)
        return spec.real.square() + spec.imag.square()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = self.power_spectrogram(wave)
        mel = torch.matmul(self.mel_fb.to(power.dtype), power)
        db = 10.0 * torch.log10(mel.clamp_min(self.log_offset))
        if self.top_db is not None:
            db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - self.top_db)
        return db


# ---------------------------------------------------------------- crops and augmentations


def random_crop(wave: torch.Tensor, clip_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training crop: a random window of ``clip_samples`` per row; shorter rows are zero-padded at the end."""
    if wave.shape[-1] < clip_samples:
        return F.pad(wave, (0, clip_samples - wave.shape[-1]))
    rows = wave.reshape(-1, wave.shape[-1])
    starts = torch.randint(0, wave.shape[-1] - clip_samples + 1, (rows.shape[0],), generator=generator)
    out = torch.stack([row[s:s + clip_samples] for row, s in zip(rows, starts.tolist())])
    return out.reshape(*wave.shape[:-1], clip_samples)


def eval_crop_starts(total: int, clip_samples: int, max_crops: int | None = None) -> list[int]:
    """Evenly spaced crop starts covering ``[0, total)``: ``ceil(total / clip)`` crops (capped by
    ``max_crops``), the first at 0 and the last ending at ``total``."""
    if total <= clip_samples:
        return [0]
    n = math.ceil(total / clip_samples)
    n = min(n, max_crops) if max_crops else n  # max_crops=1: the first window only
    return [int(round(s)) for s in np.linspace(0, total - clip_samples, n)]


def pack_eval_crops(wave: torch.Tensor, clip_samples: int, max_crops: int) -> torch.Tensor:
    """The eval layout of a clip (last axis is time): ``(..., max_crops, clip_samples + 1)``.

    Row ``i < n`` holds crop ``i`` at ``eval_crop_starts(total, clip_samples, max_crops)[i]`` and
    ``1.0`` in its last column; rows ``n..max_crops-1`` are zeros, flag ``0.0``. A clip shorter than
    ``clip_samples`` is zero-padded at the end into one crop.
    """
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, not {max_crops}")
    total = wave.shape[-1]
    starts = eval_crop_starts(total, clip_samples, max_crops)
    if total < clip_samples:
        wave = F.pad(wave, (0, clip_samples - total))
    out = wave.new_zeros(*wave.shape[:-1], max_crops, clip_samples + 1)
    out[..., :len(starts), :clip_samples] = torch.stack([wave[..., s:s + clip_samples] for s in starts], dim=-2)
    out[..., :len(starts), clip_samples] = 1
    return out


def unpack_eval_crops(packed: torch.Tensor, clip_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_eval_crops` for a batch: ``(crops (B, K, clip_samples), real (B, K) bool)``."""
    if packed.dim() != 3 or packed.shape[-1] != clip_samples + 1:
        raise ValueError(f"packed eval crops must be (batch, crops, clip_samples + 1 = {clip_samples + 1}); "
                         f"got {tuple(packed.shape)}")
    return packed[..., :clip_samples], packed[..., clip_samples] > 0.5


def random_gain(wave: torch.Tensor, db_range=(-6.0, 6.0), generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each row (last axis is time) by a gain drawn uniformly in ``db_range`` decibels."""
    low, high = db_range
    db = torch.rand(wave.shape[:-1] + (1,), generator=generator, dtype=torch.float64) * (high - low) + low
    return wave * (10.0 ** (db / 20.0)).to(wave.dtype)


def random_time_shift(wave: torch.Tensor, max_fraction: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Circularly shift each row by up to ``max_fraction`` of its length, either direction."""
    length = wave.shape[-1]
    max_shift = int(max_fraction * length)
    rows = wave.reshape(-1, length)
    shifts = torch.randint(-max_shift, max_shift + 1, (rows.shape[0],), generator=generator)
    out = torch.stack([torch.roll(row, int(s)) for row, s in zip(rows, shifts)])
    return out.reshape(wave.shape)


def mixup(waves: torch.Tensor, alpha: float = 0.2, generator: torch.Generator | None = None):
    """Mix a batch with a permutation of itself: ``lam * w + (1 - lam) * w[perm]``, ``lam ~ Beta(alpha, alpha)``.

    Returns ``(mixed, perm, lam)``; the caller mixes the targets (captions) with the same pair.
    """
    perm = torch.randperm(waves.shape[0], generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # Beta sampling has no torch generator
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam * waves + (1.0 - lam) * waves[perm], perm, lam


# ---------------------------------------------------------------- towers


class FixedNorm(nn.Module):
    """``(x - mean) / std`` with constants from the config."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class AudioTower(SignalTower):
    """Shared by the audio towers: waveform -> log-mel -> normalise -> ``features``, with eval multi-crop."""

    def __init__(self, frontend: dict | None, clip_samples: int, max_eval_crops: int | None,
                 spec_norm: str, spec_mean: float, spec_std: float):
        super().__init__()
        self.frontend = construct(LogMelSpectrogram, dict(frontend or {}), "frontend")
        self.clip_samples, self.max_eval_crops = clip_samples, max_eval_crops
        if spec_norm == "batchnorm":  # per-mel-bin statistics, as HTSAT / PANNs (bn0)
            self.spec_norm = nn.BatchNorm1d(self.frontend.n_mels)
        elif spec_norm == "fixed":  # dataset constants, as AST
            self.spec_norm = FixedNorm(spec_mean, spec_std)
        else:
            raise ValueError(f"spec_norm must be 'batchnorm' or 'fixed', not {spec_norm!r}")

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """One embedding per waveform, no cropping."""
        spec = self.frontend(wave)  # float32 (or float64) whatever the module's dtype
        dtype = next(self.parameters()).dtype  # e.g. bf16 under DeepSpeed
        return self.features(self.spec_norm(spec.to(dtype)))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, samples)`` waveforms or ``(B, K, clip_samples + 1)`` packed eval crops -> ``(B, output_dim)``."""
        if wave.dim() == 3:  # the eval transform's layout (pack_eval_crops), whatever the mode
            return self.mean_of_crops(*unpack_eval_crops(wave, self.clip_samples))
        total = wave.shape[-1]
        if self.training or total <= self.clip_samples:
            return self.encode(wave)
        starts = eval_crop_starts(total, self.clip_samples, self.max_eval_crops)
        crops = torch.stack([wave[:, s:s + self.clip_samples] for s in starts], dim=1)
        return self.mean_of_crops(crops, torch.ones(crops.shape[:2], dtype=torch.bool, device=crops.device))

    def mean_of_crops(self, crops: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Mean of the features of the real crops of each row: ``crops`` ``(B, K, samples)``,
        ``real`` ``(B, K)`` bool. Only real crops are encoded; in eval mode at most ``B`` at a time,
        so the activation memory is that of a batch of single crops."""
        counts = real.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("every clip needs at least one real crop (flag 1.0 in the last column)")
        flat = crops[real]  # (N, samples), row-major: all crops of clip 0, then clip 1, ...
        chunk = max(1, len(flat) if self.training else crops.shape[0])
        feats = torch.cat([self.encode(part) for part in flat.split(chunk)])
        rows = real.nonzero()[:, 0]
        acc = torch.promote_types(feats.dtype, torch.float32)  # sum bf16 features in float32
        sums = torch.zeros(crops.shape[0], feats.shape[-1], dtype=acc, device=feats.device)
        sums.index_add_(0, rows, feats.to(acc))
        return (sums / counts.unsqueeze(1).to(acc)).to(feats.dtype)


class AudioTransformer(AudioTower):
    """ViT over the log-mel spectrogram: Conv2d patches over (mel, time), learnable positions sized
    for ``clip_samples`` (cropped for shorter inputs, interpolated for longer), CLS or mean pooling.

    ``patch_size=[n_mels, k]`` gives "time strip" tokens; ``[16, 16]`` gives square patches.
    """

    def __init__(self, frontend: dict | None = None, clip_samples: int = 480000, max_eval_crops: int | None = None,
                 spec_norm: str = "batchnorm", spec_mean: float = 0.0, spec_std: float = 1.0,
                 patch_size=(16, 16), width: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, pool: str = "cls"):
        super().__init__(frontend, clip_samples, max_eval_crops, spec_norm, spec_mean, spec_std)
        patch_mel, patch_time = patch_size
        n_mels = self.frontend.n_mels
        if n_mels % patch_mel:
            raise ValueError(f"patch_size[0]={patch_mel} must divide n_mels={n_mels}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {pool!r}")
        self.patch_size, self.pool, self.output_dim = (patch_mel, patch_time), pool, width
        self.patch_embed = nn.Conv2d(1, width, kernel_size=self.patch_size, stride=self.patch_size)
        max_time = math.ceil(self.frontend.num_frames(clip_samples) / patch_time)
        self.pos_embed = nn.Parameter(torch.randn(1, width, n_mels // patch_mel, max_time) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def _positions(self, grid_time: int) -> torch.Tensor:
        pos = self.pos_embed
        if grid_time <= pos.shape[-1]:
            return pos[..., :grid_time]
        return F.interpolate(pos, size=(pos.shape[-2], grid_time), mode="bilinear", align_corners=False)

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        pad = -spec.shape[-1] % self.patch_size[1]
        x = self.patch_embed(F.pad(spec, (0, pad)).unsqueeze(1).to(self.patch_embed.weight.dtype))
        x = (x + self._positions(x.shape[-1]).to(x.dtype)).flatten(2).transpose(1, 2)  # (B, tokens, width)
        cls = (self.cls_token + self.cls_pos).to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.norm(self.run_blocks(torch.cat([cls, x], dim=1), self.blocks))
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)


class AudioTimm(AudioTower):
    """Any timm model over the 1-channel spectrogram (``in_chans=1, num_classes=0``, random init).

    ``model_kwargs`` go to ``timm.create_model`` (for a ViT: ``{"img_size": [n_mels, frames],
    "dynamic_img_size": true}``).
    """

    def __init__(self, model_name: str = "resnet18", frontend: dict | None = None, clip_samples: int = 480000,
                 max_eval_crops: int | None = None, spec_norm: str = "batchnorm", spec_mean: float = 0.0,
                 spec_std: float = 1.0, model_kwargs: dict | None = None):
        super().__init__(frontend, clip_samples, max_eval_crops, spec_norm, spec_mean, spec_std)
        self.trunk = timm.create_model(model_name, pretrained=False, in_chans=1, num_classes=0,
                                       **(model_kwargs or {}))
        self.output_dim = int(self.trunk.num_features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        return self.trunk(spec.unsqueeze(1))


@TOWERS.register("audio_transformer")
def build_audio_transformer(cfg: dict, embed_dim: int) -> AudioTransformer:
    return construct(AudioTransformer, cfg, "audio_transformer")


@TOWERS.register("audio_timm")
def build_audio_timm(cfg: dict, embed_dim: int) -> AudioTimm:
    return construct(AudioTimm, cfg, "audio_timm")
