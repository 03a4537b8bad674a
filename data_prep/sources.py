"""Input sources for `clip-prep shard`: a folder with sidecar captions, a CSV/TSV or JSONL (each
optionally gzipped), or a Parquet table.

Each source validates what it can up front (columns, file type) and raises `SourceError`
with one clear sentence; then it yields `SourceItem`s lazily, in a deterministic order, so
huge inputs never need to fit in memory.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from clip_train.registry import Registry
from data_prep.samples import Rejection, SourceItem

CAPTION_SUFFIX = ".txt"


class SourceError(ValueError):
    """The input cannot be read as asked; the message is shown to the user as is."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the inputs are and how to read them."""

    input: Path
    path_column: str = "filepath"
    caption_column: str = "caption"
    # The output folder, skipped when scanning an input folder that contains it.
    exclude: Path | None = None
    # Suffixes of files that head a multi-file record (the modality's record_suffixes).
    record_suffixes: tuple[str, ...] = ()
    # Table columns copied into each sample's KEY.json under their own names (img2dataset's option).
    additional_columns: tuple[str, ...] = ()
    # A column of http(s) URLs to download the media from, read instead of path_column.
    url_column: str | None = None


SourceFn = Callable[[SourceSpec], Iterator[SourceItem]]
SOURCES: Registry[SourceFn] = Registry("prep source")
_SUFFIX_TO_SOURCE = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
GZIP_SUFFIX = ".gz"


def _table_suffix(input_path: Path) -> str:
    """The table suffix of a file name, under a .gz if there is one (pairs.csv.gz -> .csv)."""
    suffixes = [s.lower() for s in input_path.suffixes]
    if suffixes[-1:] == [GZIP_SUFFIX] and len(suffixes) >= 2:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def source_kind(input_path: Path) -> str:
    """The registered source name for an input path."""
    if input_path.is_dir():
        return "folder"
    kind = _SUFFIX_TO_SOURCE.get(_table_suffix(input_path))
    if kind is None or (kind == "parquet" and input_path.suffix.lower() == GZIP_SUFFIX):
        raise SourceError(
            f"unsupported INPUT type {input_path.name!r}: expected a folder, a .csv, .tsv or .jsonl file "
            f"(each optionally .gz), or a .parquet file"
        )
    return kind


def open_text(path: Path):
    """A table file for reading as text, decompressed on the fly when it ends in .gz."""
    if path.suffix.lower() == GZIP_SUFFIX:
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")


def open_source(spec: SourceSpec) -> tuple[str, Iterator[SourceItem]]:
    """Validate the input and return (source kind, lazy iterator of items)."""
    if not spec.input.exists():
        raise SourceError(f"INPUT {str(spec.input)!r} does not exist")
    kind = source_kind(spec.input)
    return kind, SOURCES.get(kind)(spec)


# ---------------------------------------------------------------- folder of files + .txt


def _is_inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _entry_order(entry: os.DirEntry) -> str:
    """Sort key that makes a depth-first walk visit files in the order of their sorted relative
    paths: a folder sorts as NAME/, so "a.txt" (.) comes before "a/x" (/) as in a global sort."""
    return entry.name + "/" if entry.is_dir() else entry.name


def folder_files(root: Path, exclude: Path | None, per_folder: Callable[[list[Path]], Any] = list
                 ) -> Iterator[tuple[Path, Any]]:
    """Every file under root in sorted relative-path order, each with ``per_folder(files of its
    folder)``, computed once per folder (its captions and record companions are there).

    Lazy: only the folders on the current path are listed in memory, so a tree of millions of
    files starts sharding at once. Like os.walk, symlinks to folders are not followed.
    """
    exclude = exclude.resolve() if exclude is not None else None
    stack = [_listing(root, per_folder)]
    while stack:
        context, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
        elif not isinstance(entry, os.DirEntry):
            yield entry, context
        elif not entry.is_symlink() and not _is_inside(Path(entry.path).resolve(), exclude):
            stack.append(_listing(Path(entry.path), per_folder))


def _listing(folder: Path, per_folder) -> tuple[Any, Iterator]:
    """(per_folder of the folder's files, its entries in walk order: file Paths, subfolder DirEntries)."""
    entries = sorted(os.scandir(folder), key=_entry_order)
    files = [Path(entry.path) for entry in entries if not entry.is_dir()]
    return per_folder(files), iter(entry if entry.is_dir() else Path(entry.path) for entry in entries)


def list_folder_files(root: Path, exclude: Path | None) -> list[Path]:
    """All regular files under root, sorted by relative path (the order folder_source reads)."""
    return [path for path, _ in folder_files(root, exclude)]


def read_sidecar_caption(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def _is_caption_file(path: Path) -> bool:
    return path.suffix.lower() == CAPTION_SUFFIX


@SOURCES.register("folder")
def folder_source(spec: SourceSpec) -> Iterator[SourceItem]:
    """Every file that is not a caption sidecar is an input; its caption is STEM.txt beside it.

    A .txt with no media file of the same stem is an input too (rejected as missing_image),
    so that nothing in the folder is dropped without a trace. With `record_suffixes`
    (ECG: ".hea"), files sharing the stem of such a record header are its companions
    (WFDB's .dat signal file, annotations) and are read with it, not counted as inputs.
    """
    return _folder_items(_folder_inputs(spec))


def _folder_inputs(spec: SourceSpec) -> Iterator[tuple[Path, Path | None]]:
    """(input, its caption file or None), in sorted relative-path order."""
    for path, (inputs, captions) in folder_files(spec.input, spec.exclude, partial(_folder_roles, spec)):
        if path in inputs:
            yield path, captions.get(path.with_suffix(""))


def _folder_roles(spec: SourceSpec, files: list[Path]) -> tuple[set[Path], dict[Path, Path]]:
    """A folder's inputs (media files, and captions with no media file) and its captions by stem."""
    files = drop_record_companions(files, spec.record_suffixes)
    captions = {path.with_suffix(""): path for path in files if _is_caption_file(path)}
    media_stems = {path.with_suffix("") for path in files if not _is_caption_file(path)}
    inputs = {path for path in files if not _is_caption_file(path) or path.with_suffix("") not in media_stems}
    return inputs, captions


def drop_record_companions(files: list[Path], record_suffixes: tuple[str, ...]) -> list[Path]:
    suffixes = {suffix.lower() for suffix in record_suffixes}
    if not suffixes:
        return files
    record_stems = {path.with_suffix("") for path in files if path.suffix.lower() in suffixes}
    return [path for path in files
            if path.suffix.lower() in suffixes or _is_caption_file(path) or path.with_suffix("") not in record_stems]


def _folder_items(inputs: Iterator[tuple[Path, Path | None]]) -> Iterator[SourceItem]:
    for index, (path, caption_path) in enumerate(inputs):
        if _is_caption_file(path):
            orphan = Rejection("missing_image", "caption file with no media file of the same stem")
            yield SourceItem(index, str(path), path, None, orphan)
            continue
        try:
            caption = read_sidecar_caption(caption_path) if caption_path is not None else None
        except (OSError, UnicodeDecodeError) as error:
            bad_caption = Rejection("unreadable_caption", f"{caption_path}: {error}")
            yield SourceItem(index, str(path), path, None, bad_caption)
            continue
        yield SourceItem(index, str(path), path, caption)


# ---------------------------------------------------------------- CSV / TSV


def _missing_column_error(input_path: Path, column: str, flag: str, present: list[str]) -> SourceError:
    listed = ", ".join(repr(name) for name in present) or "(none)"
    return SourceError(f"column {column!r} (from {flag}) not found in {input_path.name}; columns present: {listed}")


def _check_columns(spec: SourceSpec, present: list[str]) -> None:
    media = (spec.url_column, "--url-column") if spec.url_column else (spec.path_column, "--path-column")
    wanted = [media, (spec.caption_column, "--caption-column")]
    wanted += [(column, "--save-additional-columns") for column in spec.additional_columns]
    for column, flag in wanted:
        if column not in present:
            raise _missing_column_error(spec.input, column, flag, present)


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_media_url(url: str) -> bool:
    """http(s), or a protocol fsspec can open (s3, gs, file, ...; its package may still be missing,
    which each such input then reports)."""
    scheme = _URL_SCHEME.match(url)
    if scheme is None:
        return False
    import fsspec

    return scheme.group(1).lower() in ("http", "https", *fsspec.available_protocols())


def resolve_media_path(cell: str, base_folder: Path) -> Path:
    """Relative paths in a table are relative to the table's own folder, not the cwd."""
    path = Path(cell).expanduser()
    return path if path.is_absolute() else base_folder / path


def _json_value(value):
    """A table cell as KEY.json can hold it: JSON values as they are, anything else (a Parquet
    timestamp, bytes) as its text."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


def _additional_values(record: dict, spec: SourceSpec) -> dict | None:
    """The --save-additional-columns values of a row (None when none were asked for)."""
    return {column: _json_value(record.get(column)) for column in spec.additional_columns} or None


def _url_item(index: int, record: dict, spec: SourceSpec, where: str) -> SourceItem:
    url, caption = record.get(spec.url_column), record.get(spec.caption_column)
    extra = _additional_values(record, spec)
    if not isinstance(url, str) or not url.strip():
        return SourceItem(index, where, None, None, Rejection("missing_url", f"{where}: no {spec.url_column!r} value"))
    url = url.strip()
    if not is_media_url(url):
        detail = f"{where}: neither an http(s) URL nor one of a protocol fsspec knows"
        return SourceItem(index, url, None, None, Rejection("invalid_url", detail), url=url)
    if not (caption is None or isinstance(caption, str)):
        return SourceItem(index, url, None, None, Rejection("invalid_record", f"{where}: caption is not text"), url=url)
    return SourceItem(index, url, None, caption, extra=extra, url=url)


def _item_from_record(index: int, record: dict, spec: SourceSpec, where: str) -> SourceItem:
    """One CSV row or JSONL object -> SourceItem; bad cells become rejections."""
    if spec.url_column:
        return _url_item(index, record, spec, where)
    cell = record.get(spec.path_column)
    caption = record.get(spec.caption_column)
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return SourceItem(index, where, None, None, Rejection("missing_path", f"{where}: no {spec.path_column!r} value"))
    if not isinstance(cell, str) or not (caption is None or isinstance(caption, str)):
        detail = f"{where}: {spec.path_column!r} and {spec.caption_column!r} must be strings"
        return SourceItem(index, str(cell), None, None, Rejection("invalid_record", detail))
    if _URL_SCHEME.match(cell):  # s3://, gs://, file://...: read through fsspec like a --url-column URL
        return _url_item(index, record, replace(spec, url_column=spec.path_column), where)
    extra = _additional_values(record, spec)
    return SourceItem(index, cell, resolve_media_path(cell, spec.input.parent), caption, extra=extra)


def _read_header(spec: SourceSpec, delimiter: str) -> list[str]:
    with open_text(spec.input) as table:
        return next(csv.reader(table, delimiter=delimiter), [])


def table_source(spec: SourceSpec, delimiter: str) -> Iterator[SourceItem]:
    try:
        header = _read_header(spec, delimiter)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"cannot read {spec.input}: {error}") from None
    _check_columns(spec, header)
    return _table_items(spec, delimiter)


def _table_items(spec: SourceSpec, delimiter: str) -> Iterator[SourceItem]:
    # Long captions are legitimate; the csv module's default 128 KiB field limit is not.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open_text(spec.input) as table:
        reader = csv.DictReader(table, delimiter=delimiter)
        try:
            for index, row in enumerate(reader):
                yield _item_from_record(index, row, spec, f"{spec.input.name}:{reader.line_num}")
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as error:  # OSError/EOFError: a bad .gz
            raise SourceError(f"{spec.input} line {reader.line_num}: {error}") from None


@SOURCES.register("csv")
def csv_source(spec: SourceSpec) -> Iterator[SourceItem]:
    return table_source(spec, ",")


@SOURCES.register("tsv")
def tsv_source(spec: SourceSpec) -> Iterator[SourceItem]:
    return table_source(spec, "\t")


# ---------------------------------------------------------------- JSONL


def _first_record_keys(input_path: Path) -> list[str] | None:
    """Keys of the first JSON object in the file (None when it has no object at all)."""
    with open_text(input_path) as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                return list(record)
    return None


@SOURCES.register("jsonl")
def jsonl_source(spec: SourceSpec) -> Iterator[SourceItem]:
    """One JSON object per line. Columns are checked against the first object; a later line
    that lacks a key, or is not JSON, is rejected on its own without stopping the run."""
    try:
        keys = _first_record_keys(spec.input)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise SourceError(f"cannot read {spec.input}: {error}") from None
    if keys is not None:
        _check_columns(spec, keys)
    return _jsonl_items(spec)


def _jsonl_items(spec: SourceSpec) -> Iterator[SourceItem]:
    index = 0
    with open_text(spec.input) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines are layout, not records
            where = f"{spec.input.name}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = error
            if isinstance(record, dict):
                yield _item_from_record(index, record, spec, where)
            else:
                detail = f"{where}: not a JSON object ({record})"
                yield SourceItem(index, where, None, None, Rejection("invalid_record", detail))
            index += 1


# ---------------------------------------------------------------- Parquet

PARQUET_BATCH_ROWS = 8192  # rows read at a time: a table of any size streams in bounded memory


@SOURCES.register("parquet")
def parquet_source(spec: SourceSpec) -> Iterator[SourceItem]:
    """A Parquet table (LAION, DataComp and img2dataset metadata), read batch by batch with
    pyarrow; only the path, caption and additional columns are read."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(spec.input, pre_buffer=False)  # no async reads left behind at exit (below)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"cannot read {spec.input} as Parquet: {error}") from None
    _check_columns(spec, table.schema_arrow.names)
    return _parquet_items(spec, table)


def _parquet_items(spec: SourceSpec, table) -> Iterator[SourceItem]:
    media = spec.url_column or spec.path_column
    columns = list(dict.fromkeys([media, spec.caption_column, *spec.additional_columns]))
    index = 0
    # No pre-buffering and use_threads=False: the job is parallel over processes already, and an
    # Arrow I/O or CPU thread still holding a Python buffer at interpreter exit aborts a finished
    # job ("terminate called without an active exception", apache/arrow#34314).
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, use_threads=False):
            for record in batch.to_pylist():
                yield _item_from_record(index, record, spec, f"{spec.input.name}:row {index}")
                index += 1
    finally:
        table.close()
