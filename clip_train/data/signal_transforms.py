"""Train and eval transforms for audio and ECG tensors (the image ones come from open_clip).

Every sample in a batch must have the same length, so both transforms fix it: audio to
``clip_samples`` (a random window in training, the start of the clip in evaluation; shorter clips
are zero-padded), ECG to ``samples`` (clip-prep already fixed it; this guards other sources).
Random draws use torch's global generator, which the loader seeds per epoch and worker.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.audio import random_crop, random_gain, random_time_shift
from ..models.ecg import baseline_wander, gaussian_noise, random_lead_dropout


def fix_length(x: torch.Tensor, samples: int) -> torch.Tensor:
    """Crop the end or zero-pad the last axis to exactly ``samples``."""
    if x.shape[-1] >= samples:
        return x[..., :samples]
    return F.pad(x, (0, samples - x.shape[-1]))


class AudioTransform:
    def __init__(self, clip_samples: int, train: bool, gain_db: float = 6.0, max_shift: float = 0.1):
        self.clip_samples, self.train = clip_samples, train
        self.gain_db, self.max_shift = gain_db, max_shift

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if not self.train:
            return fix_length(wave, self.clip_samples)
        wave = random_crop(wave, self.clip_samples)
        wave = random_gain(wave, (-self.gain_db, self.gain_db))
        return random_time_shift(wave, self.max_shift)


class EcgTransform:
    def __init__(self, samples: int, train: bool, sample_rate: float = 500.0, noise_std: float = 0.05,
                 wander_amplitude: float = 0.1, lead_dropout: float = 0.1):
        self.samples, self.train, self.sample_rate = samples, train, sample_rate
        self.noise_std, self.wander_amplitude, self.lead_dropout = noise_std, wander_amplitude, lead_dropout

    def __call__(self, ecg: torch.Tensor) -> torch.Tensor:
        ecg = fix_length(ecg, self.samples)
        if not self.train:
            return ecg
        batch = ecg[None]  # the augmentations work on (batch, leads, samples)
        batch = baseline_wander(batch, sample_rate=self.sample_rate, amplitude=self.wander_amplitude)
        batch = gaussian_noise(batch, std=self.noise_std)
        return random_lead_dropout(batch, p=self.lead_dropout)[0]


def signal_transforms(modality: str, preprocess_cfg: dict, augment: bool):
    """``(train_transform, eval_transform)`` for an audio or ECG model's ``preprocess_cfg``."""
    if modality == "audio":
        return AudioTransform(preprocess_cfg["clip_samples"], train=augment), \
            AudioTransform(preprocess_cfg["clip_samples"], train=False)
    rate = preprocess_cfg.get("sample_rate", 500.0)
    return EcgTransform(preprocess_cfg["samples"], train=augment, sample_rate=rate), \
        EcgTransform(preprocess_cfg["samples"], train=False, sample_rate=rate)
