"""ECG modality: WFDB / .npy / .csv records -> fixed-shape (leads, samples) arrays.

Steps, in order: pick the configured leads (names matched case-insensitively, extra leads
dropped, a missing one rejects the record) -> fill NaN/inf by linear interpolation between
the neighbouring finite samples (edges take the nearest finite value) -> resample to
--ecg-rate (polyphase, gcd-reduced factors) -> fix the length to --ecg-seconds by cropping
(crop_start: keep the beginning; crop_center: keep the middle) or zero-padding at the end.

    KEY.npy    numpy.save of a (leads, samples) float16/float32 array (load with
               allow_pickle=False)
    KEY.txt    the caption
    KEY.json   caption, leads, sample_rate, units (one per lead), shape, dtype,
               original_sample_rate, original_length, original_duration, original_leads,
               dropped_leads, nonfinite_filled, length_policy, cropped_samples,
               padded_samples, source_format, sha256 (+ signal_files_sha256 for WFDB)
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from data_prep.ecg_read import WFDB_SUFFIX, EcgRecord, read_ecg
from data_prep.samples import MODALITIES, Encoded, EncodeResult, MediaInput, Modality, Rejection, check_caption

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LENGTH_POLICIES = ("crop_start", "crop_center")
ECG_DTYPES = ("float16", "float32")
DEFAULT_ECG_RATE = 500
DEFAULT_ECG_SECONDS = 10.0
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EcgOptions:
    """What `encode_ecg_sample` needs; plain data so it pickles into worker processes."""

    leads: tuple[str, ...] = STANDARD_LEADS
    rate: int = DEFAULT_ECG_RATE
    seconds: float = DEFAULT_ECG_SECONDS
    length_policy: str = "crop_start"
    dtype: str = "float16"
    lead_names: tuple[str, ...] | None = None  # names of array rows/columns (npy/csv only)
    source_rate: float | None = None  # Hz of arrays (npy/csv only; WFDB headers have it)
    units: str = "mV"  # units of arrays (WFDB headers have theirs)

    @property
    def length(self) -> int:
        return max(1, round(self.rate * self.seconds))

    @classmethod
    def from_args(cls, args: Any) -> "EcgOptions":
        return cls(tuple(args.leads), args.ecg_rate, args.ecg_seconds, args.ecg_length_policy, args.ecg_dtype,
                   tuple(args.lead_names) if args.lead_names else None, args.source_rate, args.units)


def select_leads(record: EcgRecord, leads: tuple[str, ...]) -> tuple[np.ndarray, list[str], list[str]] | Rejection:
    """Rows of `leads` in that order, their units, and the names of the leads dropped."""
    by_name: dict[str, int] = {}
    for row, name in enumerate(record.lead_names):
        if name.strip().lower() in by_name:
            return Rejection("duplicate_leads", f"lead {name!r} appears twice in the record")
        by_name[name.strip().lower()] = row
    missing = [lead for lead in leads if lead.lower() not in by_name]
    if missing:
        return Rejection("missing_leads", f"missing lead(s) {', '.join(missing)}; record has {', '.join(record.lead_names)}")
    rows = [by_name[lead.lower()] for lead in leads]
    dropped = [name for row, name in enumerate(record.lead_names) if row not in rows]
    return record.signal[rows], [record.units[row] for row in rows], dropped


def fill_nonfinite(signal: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN/inf in each lead by linear interpolation from the finite neighbours;
    leading/trailing gaps take the nearest finite value. Every lead must have one."""
    finite = np.isfinite(signal)
    count = int(signal.size - finite.sum())
    if count == 0:
        return signal, 0
    filled = signal.copy()
    positions = np.arange(signal.shape[1])
    for lead in np.flatnonzero(~finite.all(axis=1)):
        good = finite[lead]
        filled[lead, ~good] = np.interp(positions[~good], positions[good], signal[lead, good])
    return filled, count


def resample_to(signal: np.ndarray, source_rate: float, target_rate: int) -> np.ndarray:
    """Polyphase resampling along samples; non-integer source rates use a close fraction."""
    ratio = Fraction(target_rate) / Fraction(source_rate).limit_denominator(1000)
    if ratio == 1:
        return signal
    from scipy.signal import resample_poly

    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=1)


def fix_length(signal: np.ndarray, length: int, policy: str) -> tuple[np.ndarray, int, int]:
    """Crop (start or centre) or zero-pad at the end; returns (signal, cropped, padded)."""
    have = signal.shape[1]
    if have > length:
        start = (have - length) // 2 if policy == "crop_center" else 0
        return signal[:, start:start + length], have - length, 0
    if have < length:
        return np.pad(signal, ((0, 0), (0, length - have))), 0, length - have
    return signal, 0, 0


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_ecg_record(record: EcgRecord, caption: str, options: EcgOptions) -> EncodeResult:
    """A decoded record + caption -> `Encoded` {npy, txt} + metadata, or a `Rejection`."""
    if record.signal.size == 0:
        return Rejection("empty_signal", f"signal of shape {record.signal.shape} has no samples")
    if not np.isfinite(record.signal).any():
        return Rejection("all_nan", "every sample of the record is NaN or infinite")
    selected = select_leads(record, options.leads)
    if isinstance(selected, Rejection):
        return selected
    signal, units, dropped = selected
    dead = [lead for lead, row in zip(options.leads, signal) if not np.isfinite(row).any()]
    if dead:
        return Rejection("all_nan_lead", f"lead(s) {', '.join(dead)} hold no finite sample")
    signal, filled = fill_nonfinite(signal)
    resampled = resample_to(signal, record.rate, options.rate)
    fixed, cropped, padded = fix_length(resampled, options.length, options.length_policy)
    if options.dtype == "float16" and np.abs(fixed).max() > _FLOAT16_MAX:
        return Rejection("float16_overflow", f"values up to {np.abs(fixed).max():.4g} {units[0]} overflow float16; "
                                             "use --ecg-dtype float32")
    array = fixed.astype(options.dtype)
    metadata = {
        "caption": caption,
        "leads": list(options.leads),
        "sample_rate": options.rate,
        "units": units,
        "shape": list(array.shape),
        "dtype": options.dtype,
        "duration": array.shape[1] / options.rate,
        "original_sample_rate": record.rate,
        "original_length": int(record.signal.shape[1]),
        "original_duration": record.signal.shape[1] / record.rate,
        "original_leads": list(record.lead_names),
        "dropped_leads": dropped,
        "nonfinite_filled": filled,
        "length_policy": options.length_policy,
        "cropped_samples": cropped,
        "padded_samples": padded,
        "source_format": record.source_format,
    }
    return Encoded(members={"npy": npy_bytes(array), "txt": caption.encode("utf-8")}, metadata=metadata)


def encode_ecg_sample(path_or_bytes: MediaInput, caption: str | None, options: EcgOptions) -> EncodeResult:
    """One ECG input (WFDB header path, .npy, .csv) + caption -> `Encoded` or `Rejection`."""
    record = read_ecg(path_or_bytes, options.lead_names, options.source_rate, options.units)
    if isinstance(record, Rejection):
        return record
    caption_problem = check_caption(caption)
    if caption_problem is not None:
        return caption_problem
    encoded = encode_ecg_record(record, caption.strip(), options)
    if isinstance(encoded, Encoded):
        if record.source_format == "wfdb":
            header_hash = next(h for name, h in record.hashes.items() if name.endswith(WFDB_SUFFIX))
            encoded.metadata["sha256"] = header_hash
            encoded.metadata["signal_files_sha256"] = {n: h for n, h in record.hashes.items() if not n.endswith(WFDB_SUFFIX)}
        else:
            encoded.metadata["sha256"] = record.hashes[""]
    return encoded


# A WFDB record is its .hea header plus companion files of the same stem (.dat, .atr...):
# the folder source counts the header alone as the input.
MODALITIES.register("ecg")(Modality("ecg", EcgOptions.from_args, encode_ecg_sample, record_suffixes=(WFDB_SUFFIX,)))
