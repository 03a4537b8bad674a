"""Shard writer: tar shards in img2dataset/open_clip layout, per-shard stats, sizes.json,
rejects.jsonl and, last of all, manifest.json.

Layout of an output folder:
    00000.tar, 00001.tar, ...   KEY.jpg / KEY.txt / KEY.json (+ extra members) per sample
    00000_stats.json, ...       {"shard", "count", "rejected", "rejected_by_reason", ...}
    sizes.json                  {"00000.tar": count, ...}, what open_clip reads
    rejects.jsonl               one {"index", "source", ("url",) "reason", "detail"} per rejected input
    prep_job.json               the input and options of the job, so that --resume can check them
    manifest.json               written only after every check passed: its presence means
                                the folder is complete

A job killed at any point continues with --resume (`DatasetWriter.resumed`): its complete shards
(a tar with its _stats.json, written once the tar is closed and the rejects before it are flushed)
are kept, what came after them is removed, and the inputs they account for are skipped.

Tars are byte-reproducible: fixed mtime/owner/mode, members in a fixed order, and each shard
is written to NAME.partial and renamed only once complete.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from data_prep import __version__
from data_prep.samples import Rejection

KEY_DIGITS = 12  # img2dataset uses 9; 12 leaves room for a trillion inputs
SHARD_DIGITS = 5
SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
JOB_FILE = "prep_job.json"
PARTIAL_SUFFIX = ".partial"
_TAR_MTIME = 0  # a fixed timestamp keeps shards byte-identical between runs
_OUR_FILE = re.compile(
    r"^(\d+\.tar(\.partial)?|\d+_stats\.json|sizes\.json|rejects\.jsonl|prep_job\.json|manifest\.json(\.partial)?)$")
_SHARD_FILE = re.compile(r"^(\d+)(\.tar(\.partial)?|_stats\.json(\.partial)?)$")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked; the message is shown to the user."""


class InvariantError(RuntimeError):
    """The run's own bookkeeping does not add up; the output must not be trusted."""


def key_for(index: int) -> str:
    """The sample key for an input index: zero-padded, so keys sort in input order."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(shard_index: int) -> str:
    return f"{shard_index:0{SHARD_DIGITS}d}.tar"


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


def prepare_output_dir(out_dir: Path, overwrite: bool, extra_names: Iterable[str] = ()) -> None:
    """Create the output folder; refuse a non-empty one unless the user said --overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"--out {str(out_dir)!r} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputDirError(f"output directory {str(out_dir)!r} is not empty; pass --resume to continue an "
                                 f"unfinished job there or --overwrite to replace it")
        remove_previous_output(out_dir, extra_names)
    out_dir.mkdir(parents=True, exist_ok=True)


def _cut_rejects(path: Path, accounted: int) -> None:
    """Keep the rejects.jsonl lines of inputs before `accounted`; a line cut short by a kill is dropped."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["index"] < accounted:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_text("".join(kept), encoding="utf-8")
    os.replace(partial, path)


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


@dataclass
class ShardStats:
    """Counts for one shard. A rejected input is charged to the shard that received the
    last written sample before it (or to the first shard if nothing was written yet), so
    the per-shard "rejected" counts add up to the run's total whenever a shard exists."""

    shard: str
    count: int = 0
    rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    first_index: int | None = None
    last_index: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "count": self.count,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "first_index": self.first_index,
            "last_index": self.last_index,
        }


@dataclass(frozen=True)
class RunSummary:
    inputs: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    shards: list[str]
    out_dir: Path

    def one_line(self) -> str:
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.rejected_by_reason.items())
        why = f" ({reasons})" if reasons else ""
        return (
            f"clip-prep: {self.written} written + {self.rejected} rejected{why} = {self.inputs} inputs; "
            f"{len(self.shards)} shard(s) in {self.out_dir}"
        )


class DatasetWriter:
    """Receives samples and rejections in input order and lays out one output folder."""

    def __init__(self, out_dir: Path, samples_per_shard: int, kept: list[ShardStats] | None = None):
        """`kept`: the complete shards of a resumed job (see `resumed`); rejects.jsonl is then
        appended to rather than started."""
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.closed_shards: list[ShardStats] = list(kept or [])
        self._shard: TarShard | None = None
        # collects rejects until the next shard opens
        self._stats = ShardStats(shard_name(len(self.closed_shards)))
        self._rejected_by_reason: Counter = sum((s.rejected_by_reason for s in self.closed_shards), Counter())
        self._rejects_file = open(out_dir / REJECTS_FILE, "a" if kept is not None else "w", encoding="utf-8")
        self.written = sum(s.count for s in self.closed_shards)
        self.rejected = sum(s.rejected for s in self.closed_shards)

    @classmethod
    def resumed(cls, out_dir: Path, samples_per_shard: int) -> tuple["DatasetWriter", int]:
        """(a writer continuing the unfinished job in `out_dir`, how many inputs its kept shards
        account for). Kept: shards 0, 1, ... each with its _stats.json; everything after the
        first missing one is removed, and rejects.jsonl is cut back to the kept inputs."""
        kept: list[ShardStats] = []
        while (out_dir / shard_name(len(kept))).is_file():
            stats_file = out_dir / shard_name(len(kept)).replace(".tar", "_stats.json")
            if not stats_file.is_file():
                break
            stats = json.loads(stats_file.read_text(encoding="utf-8"))
            kept.append(ShardStats(stats["shard"], stats["count"], stats["rejected"],
                                   Counter(stats["rejected_by_reason"]), stats["first_index"], stats["last_index"]))
        accounted = kept[-1].last_index + 1 if kept else 0
        for entry in out_dir.iterdir():
            numbered = _SHARD_FILE.match(entry.name)
            if (numbered and int(numbered.group(1)) >= len(kept)) or entry.name in (SIZES_FILE, MANIFEST_FILE):
                entry.unlink()
        _cut_rejects(out_dir / REJECTS_FILE, accounted)
        return cls(out_dir, samples_per_shard, kept), accounted

    def write(self, index: int, members: dict[str, bytes], metadata: dict[str, Any]) -> str:
        """Add one sample; KEY.json gets `metadata` with "key" first. Returns the key."""
        if self._shard is not None and self._stats.count >= self.samples_per_shard:
            self._close_shard()
        if self._shard is None:
            self._shard = TarShard(self.out_dir / self._stats.shard)
        key = key_for(index)
        record = {"key": key, **metadata}
        self._shard.add(key, {**members, "json": json.dumps(record, ensure_ascii=False).encode("utf-8")})
        self._note_index(index)
        self._stats.count += 1
        self.written += 1
        return key

    def reject(self, index: int, source: str, rejection: Rejection, origin: dict | None = None) -> None:
        """Record a rejected input; `origin` ({"url": ...} for a download) is added to its line."""
        line = {"index": index, "source": source, **(origin or {}), "reason": rejection.reason,
                "detail": rejection.detail}
        self._rejects_file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._note_index(index)
        self._stats.rejected += 1
        self._stats.rejected_by_reason[rejection.reason] += 1
        self._rejected_by_reason[rejection.reason] += 1
        self.rejected += 1

    def finish(self, inputs: int, manifest_fields: dict[str, Any]) -> RunSummary:
        """Close everything, check the books, then write sizes.json and manifest.json."""
        if self._shard is not None:
            self._close_shard()
        self._rejects_file.close()
        sizes = {stats.shard: stats.count for stats in self.closed_shards}
        self._check_invariants(inputs, sizes)
        write_json_atomically(self.out_dir / SIZES_FILE, sizes)
        summary = RunSummary(
            inputs, self.written, self.rejected, dict(sorted(self._rejected_by_reason.items())),
            list(sizes), self.out_dir,
        )
        write_json_atomically(self.out_dir / MANIFEST_FILE, self._manifest(summary, manifest_fields))
        return summary

    def _note_index(self, index: int) -> None:
        if self._stats.first_index is None:
            self._stats.first_index = index
        self._stats.last_index = index

    def _close_shard(self) -> None:
        # the rejects this shard accounts for reach the disk before its stats mark it complete
        self._rejects_file.flush()
        os.fsync(self._rejects_file.fileno())
        self._shard.close()
        write_json_atomically(self.out_dir / self._stats.shard.replace(".tar", "_stats.json"), self._stats.as_json())
        self.closed_shards.append(self._stats)
        self._shard = None
        self._stats = ShardStats(shard_name(len(self.closed_shards)))

    def _check_invariants(self, inputs: int, sizes: dict[str, int]) -> None:
        if self.written + self.rejected != inputs:
            raise InvariantError(
                f"written ({self.written}) + rejected ({self.rejected}) != inputs ({inputs}); output is incomplete"
            )
        if sum(sizes.values()) != self.written:
            raise InvariantError(f"shard sizes sum to {sum(sizes.values())} but {self.written} samples were written")

    def _manifest(self, summary: RunSummary, manifest_fields: dict[str, Any]) -> dict[str, Any]:
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
