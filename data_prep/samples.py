"""Records shared by every clip-prep stage, and the registry of modalities.

A source yields `SourceItem`s; a modality's encode function turns one item into either an
`Encoded` sample (tar members + metadata) or a `Rejection` (a machine-readable reason code
plus a human message). Adding a modality (as audio.py and ecg.py do) means registering one more `Modality`
in `MODALITIES`; nothing in the sources, the pipeline or the writer changes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from clip_train.registry import Registry


class MissingToolError(RuntimeError):
    """An external program a command needs is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Rejection:
    """Why one input was not written: `reason` is a short code, `detail` is for humans."""

    reason: str
    detail: str


@dataclass
class Encoded:
    """One sample ready to write: tar members by extension, and the fields of KEY.json."""

    members: dict[str, bytes]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceItem:
    """One input as a source sees it, before any file is read.

    `source` is the path string as the user wrote it (CSV/JSONL cell, or the file found in a
    folder); `path` is where to read it. A source that already knows the input is bad (an
    unparsable JSONL line, a caption file without media) sets `rejection` instead.
    """

    index: int
    source: str
    path: Path | None
    caption: str | None
    rejection: Rejection | None = None
    extra: dict | None = None  # --save-additional-columns: column name -> value, kept in KEY.json
    url: str | None = None  # an http(s) URL to download the media from (--url-column), instead of `path`


MediaInput = Union[bytes, str, Path]
EncodeResult = Union[Encoded, Rejection]


@dataclass(frozen=True)
class Modality:
    """How one kind of media becomes tar members.

    `build_options` turns the parsed CLI namespace into the (picklable) options object that
    `encode(path_or_bytes, caption, options)` receives in worker processes.
    `record_suffixes` name files that stand for a multi-file record (WFDB's `.hea`): in a
    folder, other files of the same stem (`.dat`, `.atr`, ...) are parts of that record,
    not inputs of their own.
    """

    name: str
    build_options: Callable[[Any], Any]
    encode: Callable[[MediaInput, "str | None", Any], EncodeResult]
    record_suffixes: tuple[str, ...] = ()


MODALITIES: Registry[Modality] = Registry("prep modality")


def read_media_bytes(path_or_bytes: MediaInput) -> bytes | Rejection:
    """The raw bytes of one input, or the reason they cannot be had."""
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
    else:
        path = Path(path_or_bytes)
        if not path.exists():
            return Rejection("missing_file", f"no such file: {path}")
        if not path.is_file():
            return Rejection("not_a_file", f"not a regular file: {path}")
        try:
            data = path.read_bytes()
        except OSError as error:
            return Rejection("unreadable_file", f"cannot read {path}: {error}")
    if not data:
        return Rejection("empty_file", "the file has zero bytes")
    return data


def check_caption(caption: str | None) -> Rejection | None:
    """Every written sample has a non-blank caption; say why when it does not."""
    if caption is None:
        return Rejection("missing_caption", "no caption for this input")
    if not caption.strip():
        return Rejection("empty_caption", "the caption is empty or only whitespace")
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
