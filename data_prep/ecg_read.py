"""Read one ECG input into an `EcgRecord`: a WFDB record (the `.hea` header + its signal
files), a `.npy` array or a `.csv`/`.tsv` table of numbers.

Arrays carry no lead names or rate, so they need `--lead-names` and `--source-rate`.
Orientation of an array is decided by the number of lead names N:
    shape (N, samples)  -> leads x samples (also when the array is N x N)
    shape (samples, N)  -> samples x leads, transposed
    anything else       -> rejected "wrong_lead_count"
A 1-D array is one lead (N must be 1). A CSV may have one header row (any non-numeric
first row is skipped); empty cells and "nan" are missing values, filled later.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.samples import MediaInput, Rejection, read_media_bytes, sha256_hex

WFDB_SUFFIX = ".hea"
ARRAY_SUFFIXES = (".npy", ".csv", ".tsv")
_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class EcgRecord:
    """A decoded record: signal is float64 (leads, samples) in `units`, at `rate` Hz."""

    signal: np.ndarray
    lead_names: list[str]
    rate: float
    units: list[str]
    source_format: str
    hashes: dict[str, str] = field(default_factory=dict)  # sha256 by file name (WFDB: header + signal files)


def read_wfdb(header_path: Path) -> EcgRecord | Rejection:
    """Physical signal of the record whose header is `header_path`; its signal files must
    sit where the header says (normally STEM.dat beside it)."""
    import wfdb

    record_name = str(header_path.with_suffix(""))
    try:
        header = wfdb.rdheader(record_name)
    except Exception as error:
        return Rejection("unreadable_header", f"{type(error).__name__}: {error}")
    signal_files = sorted(set(header.file_name or []))
    missing = [name for name in signal_files if not (header_path.parent / name).is_file()]
    if missing:
        return Rejection("missing_signal_file", f"signal file(s) named by the header not found: {', '.join(missing)}")
    if not header.n_sig or not header.sig_len:
        return Rejection("empty_signal", f"the header declares {header.n_sig} signals of {header.sig_len} samples")
    try:
        record = wfdb.rdrecord(record_name, physical=True)
    except Exception as error:
        return Rejection("unreadable_signal", f"{type(error).__name__}: {error}")
    if record.p_signal is None or record.p_signal.size == 0:
        return Rejection("empty_signal", "the record has no samples")
    hashes = {name: sha256_hex((header_path.parent / name).read_bytes()) for name in signal_files}
    hashes[header_path.name] = sha256_hex(header_path.read_bytes())
    units = list(record.units or ["mV"] * record.n_sig)
    return EcgRecord(np.asarray(record.p_signal, dtype=np.float64).T, list(record.sig_name), float(record.fs),
                     units, "wfdb", hashes)


def _csv_array(data: bytes) -> np.ndarray:
    text = data.decode("utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return np.zeros((0, 0))
    first = lines[0]
    delimiter = "\t" if "\t" in first else (";" if ";" in first and "," not in first else ",")

    def numeric(cell: str) -> bool:
        try:
            float(cell) if cell.strip() else None
            return True
        except ValueError:
            return False

    if not all(numeric(cell) for cell in first.split(delimiter)):
        lines = lines[1:]  # a header row
    if not lines:
        return np.zeros((0, 0))
    return np.genfromtxt(io.StringIO("\n".join(lines)), delimiter=delimiter, dtype=np.float64, ndmin=2)


def load_array(data: bytes, suffix: str) -> np.ndarray | Rejection:
    try:
        if data.startswith(_NPY_MAGIC):
            array = np.load(io.BytesIO(data), allow_pickle=False)
        elif suffix == ".npy":
            return Rejection("unreadable_array", "not a NumPy .npy file (bad magic bytes)")
        else:
            array = _csv_array(data)
    except Exception as error:  # ValueError (pickled/ragged), UnicodeDecodeError, ...
        return Rejection("unreadable_array", f"{type(error).__name__}: {error}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        return Rejection("unreadable_array", f"array of dtype {array.dtype} is not real numbers")
    return array.astype(np.float64)


def orient(array: np.ndarray, lead_count: int) -> np.ndarray | Rejection:
    """(leads, samples) from a leads x samples or samples x leads array; see module doc."""
    if array.ndim == 1:
        array = array[np.newaxis, :]
        if lead_count != 1:
            return Rejection("wrong_lead_count", f"1-D array (one lead) but --lead-names names {lead_count}")
    if array.ndim != 2:
        return Rejection("wrong_shape", f"expected a 2-D array, got shape {array.shape}")
    if array.shape[0] == lead_count:
        return array
    if array.shape[1] == lead_count:
        return array.T
    return Rejection("wrong_lead_count", f"array of shape {array.shape} has no axis of {lead_count} leads (--lead-names)")


def read_array(data: bytes, suffix: str, lead_names: tuple[str, ...] | None, rate: float | None,
               units: str) -> EcgRecord | Rejection:
    if not lead_names:
        return Rejection("missing_lead_names", "arrays carry no lead names: pass --lead-names I,II,...")
    if not rate:
        return Rejection("missing_source_rate", "arrays carry no sampling rate: pass --source-rate HZ")
    array = load_array(data, suffix)
    if isinstance(array, Rejection):
        return array
    signal = orient(array, len(lead_names))
    if isinstance(signal, Rejection):
        return signal
    return EcgRecord(signal, list(lead_names), float(rate), [units] * len(lead_names),
                     "npy" if data.startswith(_NPY_MAGIC) else "csv", {"": sha256_hex(data)})


def read_ecg(path_or_bytes: MediaInput, lead_names, rate, units: str) -> EcgRecord | Rejection:
    """Dispatch on the file suffix (bytes are sniffed: .npy magic, else CSV)."""
    if isinstance(path_or_bytes, bytes):
        suffix = ".npy" if path_or_bytes.startswith(_NPY_MAGIC) else ".csv"
    else:
        suffix = Path(path_or_bytes).suffix.lower()
        if suffix == WFDB_SUFFIX:
            path = Path(path_or_bytes)
            if not path.is_file():
                return read_media_bytes(path)  # the same missing_file / not_a_file reasons as images
            return read_wfdb(path)
        if suffix not in ARRAY_SUFFIXES:
            return Rejection("unsupported_format", f"{suffix or 'no suffix'}: expected .hea (WFDB), .npy, .csv or .tsv")
    data = read_media_bytes(path_or_bytes)
    if isinstance(data, Rejection):
        return data
    return read_array(data, suffix, lead_names, rate, units)
