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


def parse_weights(text: str, sources: int) -> list[float]:
    """``data.train_weights``: one non-negative number per ``::`` source, separated by ``,`` or ``::``."""
    parts = [p for p in text.replace("::", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"data.train_weights={text!r}: expected numbers separated by commas, e.g. 1,4") from None
    if len(weights) != sources:
        raise DataError(f"data.train_weights has {len(weights)} weight(s) for {sources} source(s) in data.train: "
                        f"give one per '::'-separated source")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise DataError(f"data.train_weights={text!r}: weights must be >= 0 and at least one positive")
    return weights


def expand_weighted_shards(spec: str, weights_text: str) -> tuple[list[str], list[float] | None]:
    """The shards of ``spec`` and, when weights are given, each shard's sampling weight: its source's
    weight, as open_clip's ``--train-data-upsampling-factors`` (a source with more shards is drawn more
    often at equal weight, so every sample of a source is equally likely)."""
    if not weights_text:
        return expand_shards(spec), None
    sources = spec.split("::")
    weights = parse_weights(weights_text, len(sources))
    urls, per_shard = [], []
    for source, weight in zip(sources, weights):
        expanded = expand_shards(source)
        urls.extend(expanded)
        per_shard.extend([weight] * len(expanded))
    return urls, per_shard


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
