"""Modalities: which shard member holds the signal and how its bytes are decoded.

A modality is a small bundle (DESIGN.md): a shard member extension, a decoder, train/eval
transforms (from the model) and a tower. Decoders only ever read media formats: ``.npy`` with
``allow_pickle=False``; never pickles.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..registry import Registry


@dataclass(frozen=True)
class Modality:
    name: str
    extensions: tuple[str, ...]  # shard member extensions, first match wins
    decode: Callable[[bytes], object]  # member bytes -> what the model's transform takes


MODALITIES: Registry[Modality] = Registry("modality")


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _decode_audio(data: bytes) -> torch.Tensor:
    """Mono float32 waveform ``(samples,)``; the sample rate was fixed by clip-prep."""
    import soundfile

    wave, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return torch.from_numpy(wave.mean(axis=1))


def _decode_ecg(data: bytes) -> torch.Tensor:
    """``(leads, samples)`` float32, in the lead order clip-prep wrote."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"ECG array must be (leads, samples), got shape {array.shape}")
    return torch.from_numpy(array.astype(np.float32))


for _modality in (Modality("image", ("jpg", "png", "jpeg", "webp"), _decode_image),
                  Modality("audio", ("flac", "wav", "ogg"), _decode_audio),
                  Modality("ecg", ("npy",), _decode_ecg)):
    MODALITIES.register(_modality.name)(_modality)
