"""What the curation commands (`clip-prep dedup`, `clip-prep balance`) share: read the samples of
a clip-prep folder in shard and key order, and write the kept ones into a new clip-prep folder.

Input: a folder of webdataset tars (those named in its sizes.json, else every *.tar, sorted).
A sample is the run of tar members whose names share a key (the name up to the first dot of its
last path part, as webdataset groups them).

Output layout:
    00000.tar, 00001.tar, ...   kept samples, N per shard, each member copied unchanged
                                (same name, same order, same bytes); tar headers as clip-prep
                                shard writes them (fixed mtime/owner/mode), so reruns are identical
    sizes.json                  {"00000.tar": count, ...}, what open_clip reads
    removed.jsonl               one {"key", "shard", "reason", ...} per removed sample
    manifest.json               written last, after kept + removed == inputs was checked: its
                                presence means the folder is complete
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_prep import __version__
from data_prep.sources import SourceError
from data_prep.writer import (InvariantError, OutputDirError, TarShard, prepare_output_dir, shard_name,
                              write_json_atomically)

SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
REMOVED_FILE = "removed.jsonl"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_MEMBERS = ("txt", "json")
DEFAULT_SAMPLES_PER_SHARD = 10000
# Files the curation commands write besides those of `clip-prep shard`: --overwrite removes them too.
CURATION_FILES = tuple(name + suffix for name in (REMOVED_FILE, "balance_stats.json", "entry_counts.tsv")
                       for suffix in ("", ".partial"))


@dataclass
class Sample:
    """One sample of an input shard: its key and its members, {extension: bytes}, in tar order."""
    key: str
    shard: str
    members: dict[str, bytes]

    def metadata(self) -> dict[str, Any]:
        """KEY.json as a dict ({} when absent or not a JSON object)."""
        try:
            value = json.loads(self.members["json"]) if "json" in self.members else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return value if isinstance(value, dict) else {}

    def caption(self) -> str | None:
        """KEY.txt, else the caption field of KEY.json; None when the sample has neither."""
        if "txt" in self.members:
            return self.members["txt"].decode("utf-8", errors="replace")
        caption = self.metadata().get("caption")
        return caption if isinstance(caption, str) else None

    def image(self) -> bytes | None:
        """The bytes of the image member (KEY.jpg, .png, ...), None for a sample without one."""
        return next((data for ext, data in self.members.items() if ext.lower() in IMAGE_EXTENSIONS), None)

    def content_digest(self) -> str:
        """sha256 of the source file, as `clip-prep shard` recorded it in KEY.json; for a sample
        without that field, sha256 of its members other than KEY.json (which holds the key)."""
        recorded = self.metadata().get("sha256")
        if isinstance(recorded, str) and recorded:
            return "source:" + recorded.lower()
        digest = hashlib.sha256()
        for ext in sorted(ext for ext in self.members if ext != "json"):
            digest.update(f"{ext}\0{len(self.members[ext])}\0".encode())
            digest.update(self.members[ext])
        return "members:" + digest.hexdigest()


@dataclass(frozen=True)
class InputShard:
    path: Path
    expected: int | None  # its count in sizes.json, when the folder has one


def input_shards(folder: Path) -> list[InputShard]:
    """The shards of a clip-prep output folder, in name order; SourceError if there are none."""
    if not folder.is_dir():
        raise SourceError(f"SHARDS {str(folder)!r} is not a folder")
    sizes_file = folder / SIZES_FILE
    if sizes_file.is_file():
        try:
            sizes = json.loads(sizes_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SourceError(f"SHARDS {str(folder)!r}: {SIZES_FILE} is not valid JSON ({error})") from None
        if not isinstance(sizes, dict) or not all(isinstance(n, int) for n in sizes.values()):
            raise SourceError(f"SHARDS {str(folder)!r}: {SIZES_FILE} is not a {{shard: count}} object")
        missing = sorted(name for name in sizes if not (folder / name).is_file())
        if missing:
            raise SourceError(f"SHARDS {str(folder)!r}: {SIZES_FILE} lists {missing[0]}, which does not exist")
        shards = [InputShard(folder / name, sizes[name]) for name in sorted(sizes)]
    else:
        shards = [InputShard(path, None) for path in sorted(folder.glob("*.tar"))]
    if not shards:
        raise SourceError(f"SHARDS {str(folder)!r} holds no .tar shards")
    return shards


def _split_member_name(name: str, shard: Path) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        raise SourceError(f"{shard.name}: member {name!r} has no KEY.EXTENSION name")
    return (f"{folder}/{stem}" if folder else stem), extension


def _shard_samples(shard: Path) -> Iterator[Sample]:
    key, members = None, {}
    try:
        with tarfile.open(shard, mode="r|") as tar:  # streamed: one member in memory at a time
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = _split_member_name(member.name, shard)
                if member_key != key:
                    if key is not None:
                        yield Sample(key, shard.name, members)
                    key, members = member_key, {}
                if extension in members:
                    raise SourceError(f"{shard.name}: member {member.name!r} appears twice")
                members[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as error:
        raise SourceError(f"{shard.name}: not a readable tar ({error})") from None
    if key is not None:
        yield Sample(key, shard.name, members)


def iter_samples(shards: Iterable[InputShard]) -> Iterator[Sample]:
    """Every sample of the shards, in order; a key seen twice or a count that disagrees with
    sizes.json is an error (the input is not what its folder says it is)."""
    seen: set[str] = set()
    for shard in shards:
        count = 0
        for sample in _shard_samples(shard.path):
            if sample.key in seen:
                raise SourceError(f"{shard.path.name}: key {sample.key!r} appears twice in SHARDS")
            seen.add(sample.key)
            count += 1
            yield sample
        if shard.expected is not None and count != shard.expected:
            raise SourceError(f"{shard.path.name} holds {count} samples but {SIZES_FILE} says {shard.expected}")


def prepare_curation_output(source: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse the input folder itself or a non-empty --out (unless --overwrite), then create it."""
    if out_dir.exists() and out_dir.resolve() == source.resolve():
        raise OutputDirError("--out must not be the SHARDS folder itself")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {str(out_dir)!r} is not empty; pass --overwrite to replace it")
    prepare_output_dir(out_dir, overwrite, CURATION_FILES)


@dataclass
class CurationSummary:
    command: str
    inputs: int
    kept: int
    removed_by_reason: dict[str, int]
    shards: list[str]
    out_dir: Path

    @property
    def removed(self) -> int:
        return sum(self.removed_by_reason.values())

    def one_line(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.removed_by_reason.items())
        return (f"clip-prep {self.command}: {self.inputs} inputs -> {self.kept} kept, {self.removed} removed"
                f"{f' ({reasons})' if reasons else ''}; {len(self.shards)} shard(s) in {self.out_dir}")


@dataclass
class CurationOutput:
    """Kept samples into shards of `samples_per_shard`, removed ones into removed.jsonl."""
    out_dir: Path
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    sizes: dict[str, int] = field(default_factory=dict)
    removed_by_reason: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._shard: TarShard | None = None
        self._removed_partial = self.out_dir / (REMOVED_FILE + ".partial")
        self._removed = open(self._removed_partial, "w", encoding="utf-8")

    @property
    def kept(self) -> int:
        return sum(self.sizes.values())

    def keep(self, sample: Sample) -> None:
        if self._shard is None or self.sizes[self._shard.path.name] == self.samples_per_shard:
            self._close_shard()
            self._shard = TarShard(self.out_dir / shard_name(len(self.sizes)))
            self.sizes[self._shard.path.name] = 0
        self._shard.add(sample.key, sample.members)
        self.sizes[self._shard.path.name] += 1

    def remove(self, sample: Sample, reason: str, **details: Any) -> None:
        line = {"key": sample.key, "shard": sample.shard, "reason": reason, **details}
        self._removed.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.removed_by_reason[reason] += 1

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def close_data(self) -> None:
        """Close the open shard and removed.jsonl (before stats files are written beside them)."""
        self._close_shard()
        if not self._removed.closed:
            self._removed.close()
            os.replace(self._removed_partial, self.out_dir / REMOVED_FILE)

    def summary(self, command: str, inputs: int) -> CurationSummary:
        return CurationSummary(command, inputs, self.kept, dict(sorted(self.removed_by_reason.items())),
                               list(self.sizes), self.out_dir)

    def finish(self, command: str, source: Path, inputs: int, fields: dict[str, Any]) -> CurationSummary:
        """Check kept + removed == inputs, then write sizes.json and, last, manifest.json."""
        self.close_data()
        removed = sum(self.removed_by_reason.values())
        if self.kept + removed != inputs:
            raise InvariantError(f"kept ({self.kept}) + removed ({removed}) != inputs ({inputs}); "
                                 f"output is incomplete")
        write_json_atomically(self.out_dir / SIZES_FILE, self.sizes)
        summary = self.summary(command, inputs)
        manifest = {"tool": "clip-prep", "version": __version__, "command": command,
                    "source": str(source.resolve()), "inputs": inputs, "kept": summary.kept,
                    "removed": summary.removed, "removed_by_reason": summary.removed_by_reason,
                    "shards": summary.shards, "samples_per_shard": self.samples_per_shard, **fields,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json_atomically(self.out_dir / MANIFEST_FILE, manifest)
        return summary


def options_for_manifest(options: dict[str, Any]) -> dict[str, Any]:
    return {name: str(value) if isinstance(value, Path) else value for name, value in options.items()
            if name != "run"}


def note_unfinished_input(folder: Path, command: str) -> None:
    """A folder without manifest.json is an unfinished clip-prep job or another tool's output: go on
    (its tars are read as they are) but say so."""
    if not (folder / MANIFEST_FILE).is_file():
        print(f"clip-prep {command}: note: {folder} has no {MANIFEST_FILE} (an unfinished clip-prep job, or "
              f"another tool's shards); reading the tars it holds", file=sys.stderr)
