"""Shard writer: tar shards in img2dataset/open_clip layout, per-shard stats and metadata,
sizes.json, rejects.jsonl and, last of all, manifest.json.

Layout of an output folder:
    00000.tar, 00001.tar, ...   KEY.jpg / KEY.txt / KEY.json (+ extra members) per written sample
    00000.parquet, ...          one row per input of the shard, written or not (img2dataset's columns:
                                key, status, error_message, url, caption, width, height, sha256, ...)
    00000_stats.json, ...       img2dataset's fields (count, successes, failed_to_download,
                                failed_to_resize, duration, status_dict, ...) plus ours
                                (rejected, rejected_by_reason, first_index, last_index)
    sizes.json                  {"00000.tar": count, ...}, what open_clip reads
    rejects.jsonl               one {"index", "source", ("url",) "reason", "detail"} per rejected input
    prep_job.json               the input and options of the job, so that --resume can check them
    manifest.json               written only after every check passed: its presence means
                                the folder is complete

Shard N holds inputs [N * samples_per_shard, (N + 1) * samples_per_shard), as img2dataset cuts
them: which shard an input lands in depends on its position only, never on which other inputs
failed. So any process (a local worker pool or a Ray task) can write any shard alone, a resumed
job redoes exactly the shards that are not complete, and every distributor writes the same bytes.
A shard whose inputs were all rejected has stats and a parquet but no tar.

A shard is complete once its _stats.json exists: the tar and the parquet are written to
NAME.partial and renamed first. rejects.jsonl is put together from the shards' parquets at the end.
Tars are byte-reproducible: fixed mtime/owner/mode and members in a fixed order.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from data_prep import __version__
from data_prep.samples import Rejection
from data_prep.store import LocalStore, RemoteStore, Store, open_store, write_json

KEY_DIGITS = 12  # img2dataset uses 9; 12 leaves room for a trillion inputs
SHARD_DIGITS = 5
SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
JOB_FILE = "prep_job.json"
PARTIAL_SUFFIX = ".partial"
SUCCESS = "success"
_TAR_MTIME = 0  # a fixed timestamp keeps shards byte-identical between runs
_OUR_FILE = re.compile(r"^(\d+(\.tar|\.parquet|_stats\.json)(\.partial)?|sizes\.json|rejects\.jsonl(\.partial)?|"
                       r"prep_job\.json|manifest\.json(\.partial)?)$")
_SHARD_FILE = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)(\.partial)?$")
# Timing fields of a shard's stats: the only bytes that differ between two runs of one job.
TIMING_FIELDS = ("duration", "start_time", "end_time")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked; the message is shown to the user."""


class InvariantError(RuntimeError):
    """The run's own bookkeeping does not add up; the output must not be trusted."""


def key_for(index: int) -> str:
    """The sample key for an input index: zero-padded, so keys sort in input order."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(shard_index: int) -> str:
    return f"{shard_index:0{SHARD_DIGITS}d}.tar"


def stats_name(shard_index: int) -> str:
    return f"{shard_index:0{SHARD_DIGITS}d}_stats.json"


def parquet_name(shard_index: int) -> str:
    return f"{shard_index:0{SHARD_DIGITS}d}.parquet"


def as_store(out: Path | str | Store) -> Store:
    return out if isinstance(out, (LocalStore, RemoteStore)) else open_store(out)


def write_json_atomically(path: Path, payload: Any) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def remove_previous_output(out_dir: Path, extra_names: Iterable[str] = ()) -> None:
    """Delete what an earlier clip-prep run wrote here, and nothing else.

    manifest.json goes first: if we crash half way, the folder must not look complete.
    """
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for entry in out_dir.iterdir():
        if entry.is_file() and (_OUR_FILE.match(entry.name) or entry.name in extra_names):
            entry.unlink()


def _not_empty_error(out: Any) -> OutputDirError:
    return OutputDirError(f"output directory {str(out)!r} is not empty; pass --resume to continue an "
                          f"unfinished job there or --overwrite to replace it")


def _prepare_remote(store: RemoteStore, overwrite: bool) -> None:
    names = store.names()
    if names and not overwrite:
        raise _not_empty_error(store)
    store.remove(MANIFEST_FILE)  # first: a half-cleared folder must not look complete
    for name in names:
        if _OUR_FILE.match(name):
            store.remove(name)
    store.make()


def prepare_output_dir(out_dir: Path | Store, overwrite: bool, extra_names: Iterable[str] = ()) -> None:
    """Create the output folder; refuse a non-empty one unless the user said --overwrite."""
    if isinstance(out_dir, RemoteStore):
        return _prepare_remote(out_dir, overwrite)
    out_dir = out_dir.root if isinstance(out_dir, LocalStore) else out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"--out {str(out_dir)!r} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise _not_empty_error(out_dir)
        remove_previous_output(out_dir, extra_names)
    out_dir.mkdir(parents=True, exist_ok=True)


class TarShard:
    """One tar being written; it appears under its final name only when closed."""

    def __init__(self, path: Path):
        self.path = path
        self._partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self._tar = tarfile.open(self._partial, "w", format=tarfile.PAX_FORMAT)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for extension, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(payload), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(payload))

    def close(self) -> None:
        self._tar.close()
        os.replace(self._partial, self.path)


def _failure_status(reason: str) -> str:
    """img2dataset's two kinds of failure: the media never arrived, or it arrived and could not be used."""
    from data_prep.download import DOWNLOAD_REASONS

    return "failed_to_download" if reason in DOWNLOAD_REASONS else "failed_to_resize"


@dataclass
class ShardStats:
    """Counts for one shard, i.e. one fixed range of inputs."""

    shard: str
    count: int = 0  # inputs of the shard (img2dataset's meaning), written or not
    successes: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    first_index: int | None = None
    last_index: int | None = None
    start_time: float = 0.0
    end_time: float = 0.0

    @property
    def rejected(self) -> int:
        return self.count - self.successes

    def note(self, index: int) -> None:
        if self.first_index is None:
            self.first_index = index
        self.last_index = index
        self.count += 1

    def as_json(self) -> dict[str, Any]:
        failures = Counter(_failure_status(reason) for reason in self.rejected_by_reason.elements())
        return {
            "shard": self.shard,
            "count": self.count,
            "successes": self.successes,
            "failed_to_download": failures["failed_to_download"],
            "failed_to_resize": failures["failed_to_resize"],
            "duration": round(self.end_time - self.start_time, 3),
            "start_time": round(self.start_time, 3),
            "end_time": round(self.end_time, 3),
            "status_dict": {SUCCESS: self.successes, **dict(sorted(self.rejected_by_reason.items()))},
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "first_index": self.first_index,
            "last_index": self.last_index,
        }

    @classmethod
    def from_json(cls, stats: dict[str, Any]) -> "ShardStats":
        return cls(stats["shard"], stats["count"], stats["successes"], Counter(stats["rejected_by_reason"]),
                   stats["first_index"], stats["last_index"], stats["start_time"], stats["end_time"])


# The per-sample table of a shard: img2dataset's columns, plus our reason code and source.
PARQUET_COLUMNS = (("key", "string"), ("status", "string"), ("reason", "string"), ("error_message", "string"),
                   ("source", "string"), ("url", "string"), ("caption", "string"), ("width", "int64"),
                   ("height", "int64"), ("sha256", "string"))


def _as_text(value: Any) -> str | None:
    """An additional column's value for the parquet: text, so that every shard has one schema."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class ShardWriter:
    """Writes the shard holding one range of inputs: its tar, parquet and, last, its stats."""

    def __init__(self, out: Path | Store, shard_index: int, extra_columns: Iterable[str] = ()):
        self.store = as_store(out)
        self.index = shard_index
        self.extra_columns = tuple(extra_columns)
        self.stats = ShardStats(shard_name(shard_index), start_time=time.time())
        self._tar: TarShard | None = None
        self._rows: list[dict[str, Any]] = []

    def write(self, index: int, members: dict[str, bytes], metadata: dict[str, Any]) -> str:
        """Add one sample; KEY.json gets `metadata` with "key" first. Returns the key."""
        if self._tar is None:
            self._tar = TarShard(self.store.staging / self.stats.shard)
        key = key_for(index)
        record = {"key": key, **metadata}
        self._tar.add(key, {**members, "json": json.dumps(record, ensure_ascii=False).encode("utf-8")})
        self.stats.note(index)
        self.stats.successes += 1
        self._rows.append(self._row(key, SUCCESS, None, None, record))
        return key

    def reject(self, index: int, source: str, rejection: Rejection, fields: dict | None = None) -> None:
        """Record a rejected input; `fields` (url, caption, additional columns) go to its parquet row."""
        self.stats.note(index)
        self.stats.rejected_by_reason[rejection.reason] += 1
        row_fields = {"source": source, **(fields or {})}
        self._rows.append(self._row(key_for(index), _failure_status(rejection.reason), rejection.reason,
                                    rejection.detail, row_fields))

    def _row(self, key: str, status: str, reason: str | None, detail: str | None, record: dict) -> dict:
        row = {"key": key, "status": status, "reason": reason, "error_message": detail}
        for name, _ in PARQUET_COLUMNS[4:]:
            row[name] = record.get(name)
        for name in self.extra_columns:
            row[name] = _as_text(record.get(name))
        return row

    def close(self) -> ShardStats:
        if self._tar is not None:
            self._tar.close()
            self.store.commit(self._tar.path, self.stats.shard)
        self._write_parquet()
        self.stats.end_time = time.time()
        write_json(self.store, stats_name(self.index), self.stats.as_json())
        return self.stats

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([*PARQUET_COLUMNS, *((name, "string") for name in self.extra_columns)])
        table = pa.Table.from_pylist(self._rows, schema=schema)
        path = self.store.staging / parquet_name(self.index)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        pq.write_table(table, partial)
        os.replace(partial, path)
        self.store.commit(path, path.name)


@dataclass(frozen=True)
class RunSummary:
    inputs: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    shards: list[str]
    out_dir: Path | Store

    def one_line(self) -> str:
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.rejected_by_reason.items())
        why = f" ({reasons})" if reasons else ""
        return (
            f"clip-prep: {self.written} written + {self.rejected} rejected{why} = {self.inputs} inputs; "
            f"{len(self.shards)} shard(s) in {self.out_dir}"
        )


def complete_shards(store: Store) -> dict[int, ShardStats]:
    """The shards of an unfinished job that are complete: stats written (which comes last) and
    their tar (when anything was written) and parquet present."""
    names = set(store.names())
    complete = {}
    for name in names:
        numbered = _SHARD_FILE.match(name)
        if not numbered or not name.endswith("_stats.json"):
            continue
        index = int(numbered.group(1))
        try:
            stats = ShardStats.from_json(json.loads(store.read_bytes(name)))
        except (ValueError, KeyError, TypeError):
            continue
        has_tar = stats.successes == 0 or shard_name(index) in names
        if has_tar and parquet_name(index) in names:
            complete[index] = stats
    return complete


def clear_incomplete(store: Store, complete: dict[int, ShardStats]) -> None:
    """Remove what a killed job left that a resumed one redoes: the files of incomplete shards,
    and the files written only at the end."""
    for name in (MANIFEST_FILE, SIZES_FILE, REJECTS_FILE):
        store.remove(name)
    for name in store.names():
        numbered = _SHARD_FILE.match(name)
        if numbered and (int(numbered.group(1)) not in complete or name.endswith(PARTIAL_SUFFIX)):
            store.remove(name)


def _write_rejects(store: Store, shards: Iterable[int]) -> None:
    """rejects.jsonl from the shards' parquets, in input order, whichever process wrote them."""
    import pyarrow.parquet as pq

    local = store.staging / REJECTS_FILE
    partial = local.with_name(REJECTS_FILE + PARTIAL_SUFFIX)
    columns = ["key", "status", "reason", "error_message", "source", "url"]
    with open(partial, "w", encoding="utf-8") as rejects:
        for index in shards:
            # ParquetFile without pre-buffering, not read_table: an Arrow thread still holding this Python
            # file's buffer at interpreter exit aborts the process ("terminate called without an active
            # exception", apache/arrow#34314; seen in a Ray driver).
            with store.open(parquet_name(index)) as parquet, pq.ParquetFile(parquet, pre_buffer=False) as table:
                rows = table.read(columns=columns, use_threads=False).to_pylist()
            for row in rows:
                if row["status"] == SUCCESS:
                    continue
                line = {"index": int(row["key"]), "source": row["source"],
                        **({"url": row["url"]} if row["url"] is not None else {}),
                        "reason": row["reason"], "detail": row["error_message"]}
                rejects.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(partial, local)
    store.commit(local, REJECTS_FILE)


def finish_dataset(out: Path | Store, shards: dict[int, ShardStats], inputs: int, samples_per_shard: int,
                   manifest_fields: dict[str, Any]) -> RunSummary:
    """Check the books of every shard against the input count, then write rejects.jsonl,
    sizes.json and, last, manifest.json."""
    store = as_store(out)
    written = sum(stats.successes for stats in shards.values())
    rejected = sum(stats.rejected for stats in shards.values())
    if written + rejected != inputs:
        raise InvariantError(f"written ({written}) + rejected ({rejected}) != inputs ({inputs}); output is incomplete")
    expected = -(-inputs // samples_per_shard)
    missing = sorted(set(range(expected)) - set(shards))
    if missing or len(shards) != expected:
        raise InvariantError(f"shards {missing or sorted(set(shards) - set(range(expected)))} do not match "
                             f"{inputs} inputs at {samples_per_shard} per shard; output is incomplete")
    order = sorted(shards)
    _write_rejects(store, order)
    sizes = {shards[i].shard: shards[i].successes for i in order if shards[i].successes}
    write_json(store, SIZES_FILE, sizes)
    by_reason = sum((shards[i].rejected_by_reason for i in order), Counter())
    summary = RunSummary(inputs, written, rejected, dict(sorted(by_reason.items())), list(sizes),
                         out if isinstance(out, Path) else store)
    write_json(store, MANIFEST_FILE, _manifest(summary, manifest_fields))
    return summary


def _manifest(summary: RunSummary, manifest_fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool": "clip-prep",
        "version": __version__,
        "inputs": summary.inputs,
        "written": summary.written,
        "rejected": summary.rejected,
        "rejected_by_reason": summary.rejected_by_reason,
        "shards": summary.shards,
        **manifest_fields,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class DatasetWriter:
    """Receives samples and rejections in input order and lays out one output folder, one
    shard at a time."""

    def __init__(self, out: Path | Store, samples_per_shard: int, complete: dict[int, ShardStats] | None = None,
                 extra_columns: Iterable[str] = ()):
        """`complete`: the shards a resumed job keeps (see `resumed`); their inputs must not come again."""
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.out = out
        self.store = as_store(out)
        self.samples_per_shard = samples_per_shard
        self.extra_columns = tuple(extra_columns)
        self.shards: dict[int, ShardStats] = dict(complete or {})
        self._open: ShardWriter | None = None

    @classmethod
    def resumed(cls, out: Path | Store, samples_per_shard: int,
                extra_columns: Iterable[str] = ()) -> "DatasetWriter":
        """A writer continuing the unfinished job in `out`: its complete shards are kept and
        the files of every other shard removed (see `complete_shards`)."""
        store = as_store(out)
        complete = complete_shards(store)
        clear_incomplete(store, complete)
        return cls(out, samples_per_shard, complete, extra_columns)

    def shard_of(self, index: int) -> int:
        return index // self.samples_per_shard

    def write(self, index: int, members: dict[str, bytes], metadata: dict[str, Any]) -> str:
        return self._shard_for(index).write(index, members, metadata)

    def reject(self, index: int, source: str, rejection: Rejection, fields: dict | None = None) -> None:
        self._shard_for(index).reject(index, source, rejection, fields)

    def finish(self, inputs: int, manifest_fields: dict[str, Any]) -> RunSummary:
        """Close the last shard, check the books, then write sizes.json and manifest.json."""
        self._close_open_shard()
        return finish_dataset(self.out, self.shards, inputs, self.samples_per_shard, manifest_fields)

    def _shard_for(self, index: int) -> ShardWriter:
        shard = self.shard_of(index)
        if shard in self.shards:
            raise InvariantError(f"input {index} belongs to shard {shard}, which is already complete")
        if self._open is not None and self._open.index != shard:
            self._close_open_shard()
        if self._open is None:
            self._open = ShardWriter(self.store, shard, self.extra_columns)
        return self._open

    def _close_open_shard(self) -> None:
        if self._open is not None:
            self.shards[self._open.index] = self._open.close()
            self._open = None
