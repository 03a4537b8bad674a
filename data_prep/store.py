"""Where a `clip-prep shard` output lives: a local folder, or a folder behind an fsspec URL
(`s3://bucket/prefix`, `gs://...`).

Every file is made in a local folder first and then committed under its final name: renamed
in place for a local folder, uploaded (and the local copy removed) for a remote one. An object
store shows an object only once its upload is complete, so a remote output has the same
property as a local one: a file that is there is whole, and a shard's stats, committed last,
mean the shard is complete.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and bool(_URL.match(location))


class LocalStore:
    """A folder on this machine (or one every node mounts)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def staging(self) -> Path:
        """Where files are made before they are committed: the folder itself (then renamed)."""
        return self.root

    def exists(self) -> bool:
        return self.root.exists()

    def is_folder(self) -> bool:
        return self.root.is_dir()

    def make(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_file()) if self.root.is_dir() else []

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def commit(self, local: Path, name: str) -> None:
        if local != self.root / name:
            os.replace(local, self.root / name)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class RemoteStore:
    """A folder behind an fsspec URL; files are made in a private local folder, then uploaded."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self._staging: Path | None = None

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict[str, Any]:  # each process (a Ray worker) stages in its own folder
        return {**self.__dict__, "_staging": None}

    @property
    def staging(self) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="clip-prep-staging-"))
        return self._staging

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_folder(self) -> bool:
        return not self.fs.isfile(self.path)

    def make(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def names(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        self.fs.invalidate_cache(self.path)
        return sorted(entry["name"].rsplit("/", 1)[-1] for entry in self.fs.ls(self.path, detail=True)
                      if entry["type"] == "file")

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._key(name))

    def open(self, name: str) -> BinaryIO:
        return self.fs.open(self._key(name), "rb")

    def commit(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), self._key(name))
        local.unlink()

    def remove(self, name: str) -> None:
        if self.fs.exists(self._key(name)):
            self.fs.rm_file(self._key(name))


Store = LocalStore | RemoteStore


def open_store(location: str | Path) -> Store:
    return RemoteStore(location) if is_url(location) else LocalStore(Path(location))


def write_json(store: Store, name: str, payload: Any) -> None:
    """`payload` as NAME in `store`, whole or not at all."""
    partial = store.staging / (name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    local = store.staging / name
    os.replace(partial, local)
    store.commit(local, name)
