"""Train and eval transforms for audio and ECG tensors (the image ones come from open_clip).

Every sample in a batch must have the same shape, so the transforms fix it:

- audio, training: a random ``clip_samples`` window (shorter clips zero-padded), then gain and
  time shift; without augmentation, the first ``clip_samples`` (:class:`AudioTransform`).
- audio, evaluation: the whole clip as ``max_eval_crops`` rows of ``clip_samples + 1``
  (:class:`AudioEvalTransform`, layout in ``clip_train.models.audio.pack_eval_crops``): up to
  ``max_eval_crops`` evenly spaced crops covering the clip, each followed by a real/padding flag;
  the audio tower averages the embeddings of the real crops. ``preprocess_cfg["max_eval_crops"]``
  sets the count; absent or ``None`` means :data:`DEFAULT_MAX_EVAL_CROPS`; ``1`` gives the old
  single window at the start of the clip.
- ECG: ``samples`` (clip-prep already fixed it; this guards other sources).

Random draws use torch's global generator, which the loader seeds per epoch and worker.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.audio import pack_eval_crops, random_crop, random_gain, random_time_shift
from ..models.ecg import baseline_wander, gaussian_noise, random_lead_dropout

# Crops per clip at evaluation when preprocess_cfg has no max_eval_crops: clips up to 4 x clip_samples
# are covered end to end; longer ones by 4 evenly spaced crops. Eval memory per clip is 4 crops.
DEFAULT_MAX_EVAL_CROPS = 4


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


class AudioEvalTransform:
    """Waveform ``(samples,)`` -> ``(max_crops, clip_samples + 1)`` packed eval crops (see
    ``clip_train.models.audio.pack_eval_crops``); ``max_crops=None`` is :data:`DEFAULT_MAX_EVAL_CROPS`."""

    def __init__(self, clip_samples: int, max_crops: int | None = None):
        max_crops = DEFAULT_MAX_EVAL_CROPS if max_crops is None else max_crops
        if isinstance(max_crops, bool) or not isinstance(max_crops, int) or max_crops < 1:
            raise ValueError(f"max_eval_crops must be a positive integer or null, not {max_crops!r}")
        self.clip_samples, self.max_crops = clip_samples, max_crops

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        return pack_eval_crops(wave, self.clip_samples, self.max_crops)


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
        clip_samples = preprocess_cfg["clip_samples"]
        return AudioTransform(clip_samples, train=augment), \
            AudioEvalTransform(clip_samples, preprocess_cfg.get("max_eval_crops"))
    rate = preprocess_cfg.get("sample_rate", 500.0)
    return EcgTransform(preprocess_cfg["samples"], train=augment, sample_rate=rate), \
        EcgTransform(preprocess_cfg["samples"], train=False, sample_rate=rate)
