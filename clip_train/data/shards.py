"""Resolve a shard specification into a list of URLs and count the samples they hold."""
from __future__ import annotations

import json
from pathlib import Path

import braceexpand


class DataError(ValueError):
    """Training data that cannot be used; the message says what is wrong."""


def expand_shards(spec: str) -> list[str]:
    """``spec`` is a directory of ``*.tar``, a brace pattern, a URL (``pipe:``, ``s3://``...), or several joined by ``::``."""
    if not spec:
        raise DataError("no training shards: set data.train to a shard directory or pattern")
    urls: list[str] = []
    for part in spec.split("::"):
        path = Path(part)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise DataError(f"no .tar shards in directory {part}")
            urls.extend(found)
        else:
            urls.extend(braceexpand.braceexpand(part))
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if local_missing:
        raise DataError(f"shard not found: {local_missing[0]} ({len(local_missing)} of {len(urls)} missing)")
    return urls


def count_samples(urls: list[str]) -> int | None:
    """Sum the counts from each local shard's ``sizes.json`` (the file open_clip reads); None if unknown."""
    sizes_cache: dict[Path, dict] = {}
    total = 0
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if not sizes_file.is_file():
            return None
        if sizes_file not in sizes_cache:
            sizes_cache[sizes_file] = json.loads(sizes_file.read_text())
        if path.name not in sizes_cache[sizes_file]:
            return None
        total += int(sizes_cache[sizes_file][path.name])
    return total
