"""Audio modality: decode with soundfile, mix to mono, resample, optionally crop, store as FLAC.

    KEY.flac   mono, 16-bit PCM, at --sample-rate (default 48000 Hz, as LAION-CLAP)
    KEY.txt    the caption
    KEY.json   caption, duration (after processing), sample_rate, original_sample_rate,
               original_channels, original_duration, original_format, cropped, crop_policy,
               clipped_samples, sha256 (of the source bytes); the pipeline adds "source"

Inputs: anything the installed libsndfile decodes (WAV, FLAC, OGG/Vorbis, MP3 with
libsndfile >= 1.1, AIFF, ...). Every failure becomes a `Rejection`, never an exception.
Clips are not padded: fixing the length (CLAP's 10 s crop/fusion) is the trainer's job.
"""
from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_prep.samples import (
    MODALITIES,
    Encoded,
    EncodeResult,
    MediaInput,
    Modality,
    Rejection,
    check_caption,
    read_media_bytes,
    sha256_hex,
)

DEFAULT_SAMPLE_RATE = 48_000
MAX_FLAC_SAMPLE_RATE = 655_350  # the largest rate a FLAC STREAMINFO block can state
CROP_POLICY = "crop_start"  # --max-duration keeps the first SECONDS of a clip
_PCM16_FULL_SCALE = 32767
_STREAMING_SIZE = 0x7FFF0000
# Signatures of containers libsndfile reads: a file that starts like audio but does not
# decode is "unreadable_audio"; anything else is "not_audio".
_AUDIO_SIGNATURES = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


@dataclass(frozen=True)
class AudioOptions:
    """What `encode_audio_sample` needs; plain data so it pickles into worker processes."""

    sample_rate: int = DEFAULT_SAMPLE_RATE
    max_duration: float | None = None  # seconds; longer clips keep their first max_duration s

    @classmethod
    def from_args(cls, args: Any) -> "AudioOptions":
        return cls(args.sample_rate, args.max_duration)


def _looks_like_audio(data: bytes) -> bool:
    return any(data.startswith(signature) for signature in _AUDIO_SIGNATURES)


def wav_is_truncated(data: bytes) -> bool:
    """True when a RIFF/WAVE file's data chunk declares more bytes than the file holds.

    libsndfile silently shortens such a file to what is there, so we check the header
    ourselves. A size of 0 or one of 2 GiB or more is a streaming placeholder ("unknown
    length": espeak-ng --stdout writes 0x7FFFF000, other tools 0xFFFFFFFF), not an error.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if chunk_id == b"data":
            return 0 < size < _STREAMING_SIZE and offset + 8 + size > len(data)
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    return False


def decode_audio(data: bytes) -> tuple[np.ndarray, int, str] | Rejection:
    """Bytes -> (float32 array frames x channels, sample rate, format name) or a Rejection."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            declared_frames, audio_format = sound.frames, sound.format
            samples = sound.read(dtype="float32", always_2d=True)
            rate = sound.samplerate
    except Exception as error:  # LibsndfileError, or RuntimeError from a decoder
        if not _looks_like_audio(data):
            return Rejection("not_audio", f"libsndfile does not recognise the file as audio ({error})")
        reason = "truncated_audio" if "lost sync" in str(error) or "malformed" in str(error) else "unreadable_audio"
        return Rejection(reason, f"{type(error).__name__}: {error}")
    if wav_is_truncated(data) or (audio_format != "MPEG" and 0 < len(samples) < declared_frames):
        return Rejection("truncated_audio", f"header declares more audio than the file holds ({len(samples)} frames read)")
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        return Rejection("empty_audio", "the file decodes to zero samples")
    if rate <= 0:
        return Rejection("unreadable_audio", f"invalid sample rate {rate}")
    if not np.isfinite(samples).all():
        return Rejection("nonfinite_audio", "the decoded samples contain NaN or infinity")
    return samples, rate, audio_format


def resample(signal: np.ndarray, source_rate: int, target_rate: int, axis: int = -1) -> np.ndarray:
    """Polyphase resampling with the gcd-reduced up/down factors (scipy.signal.resample_poly)."""
    if source_rate == target_rate:
        return signal
    from scipy.signal import resample_poly

    common = math.gcd(int(source_rate), int(target_rate))
    return resample_poly(signal, target_rate // common, source_rate // common, axis=axis)


def flac_bytes(mono: np.ndarray, rate: int) -> tuple[bytes, int]:
    """Float samples in [-1, 1] -> 16-bit FLAC bytes, and how many samples had to be clipped."""
    import soundfile

    clipped = int(np.count_nonzero(np.abs(mono) > 1.0))
    pcm = np.round(np.clip(mono, -1.0, 1.0) * _PCM16_FULL_SCALE).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue(), clipped


def process_audio(samples: np.ndarray, rate: int, options: AudioOptions) -> tuple[np.ndarray, bool]:
    """frames x channels at `rate` -> mono float64 at options.sample_rate, cropped if asked."""
    mono = samples.astype(np.float64).mean(axis=1)
    cropped = False
    if options.max_duration is not None and len(mono) > options.max_duration * rate:
        # Crop before resampling (cheaper), keeping one extra source sample so that the
        # exact target length is available after the rate change.
        mono = mono[: math.ceil(options.max_duration * rate) + 1]
        cropped = True
    mono = resample(mono, rate, options.sample_rate)
    if cropped:
        mono = mono[: max(1, round(options.max_duration * options.sample_rate))]
    return mono, cropped


def encode_audio_array(samples: np.ndarray, rate: int, caption: str, options: AudioOptions) -> Encoded:
    """Known-good decoded audio (frames x channels) + caption -> FLAC/txt members + metadata."""
    mono, cropped = process_audio(samples, rate, options)
    flac, clipped = flac_bytes(mono, options.sample_rate)
    metadata = {
        "caption": caption,
        "duration": len(mono) / options.sample_rate,
        "sample_rate": options.sample_rate,
        "original_sample_rate": rate,
        "original_channels": int(samples.shape[1]),
        "original_duration": samples.shape[0] / rate,
        "cropped": cropped,
        "crop_policy": CROP_POLICY if options.max_duration is not None else None,
        "max_duration": options.max_duration,
        "clipped_samples": clipped,
    }
    return Encoded(members={"flac": flac, "txt": caption.encode("utf-8")}, metadata=metadata)


def encode_audio_sample(path_or_bytes: MediaInput, caption: str | None, options: AudioOptions) -> EncodeResult:
    """One (audio file, caption) input -> `Encoded` {flac, txt} + metadata, or a `Rejection`."""
    data = read_media_bytes(path_or_bytes)
    if isinstance(data, Rejection):
        return data
    decoded = decode_audio(data)
    if isinstance(decoded, Rejection):
        return decoded
    caption_problem = check_caption(caption)
    if caption_problem is not None:
        return caption_problem
    samples, rate, audio_format = decoded
    encoded = encode_audio_array(samples, rate, caption.strip(), options)
    encoded.metadata.update(original_format=audio_format, sha256=sha256_hex(data))
    return encoded


MODALITIES.register("audio")(Modality("audio", AudioOptions.from_args, encode_audio_sample))
