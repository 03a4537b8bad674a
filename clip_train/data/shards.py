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


def _stats_size(shard: Path) -> int | None:
    """The sample count in a shard's ``NAME_stats.json``: img2dataset's ``successes`` (the samples
    it wrote), or clip-prep's ``count``; None without such a file."""
    stats_file = shard.with_name(f"{shard.stem}_stats.json")
    if not stats_file.is_file():
        return None
    stats = json.loads(stats_file.read_text())
    value = stats.get("successes", stats.get("count"))
    return None if value is None else int(value)


def shard_size(shard: Path, sizes_cache: dict[Path, dict]) -> int | None:
    """A local shard's sample count: its entry in ``sizes.json`` beside it (the file open_clip
    reads), else its ``_stats.json`` (img2dataset's output has no sizes.json); None if neither."""
    sizes_file = shard.parent / "sizes.json"
    if sizes_file.is_file():
        if sizes_file not in sizes_cache:
            sizes_cache[sizes_file] = json.loads(sizes_file.read_text())
        if shard.name in sizes_cache[sizes_file]:
            return int(sizes_cache[sizes_file][shard.name])
    return _stats_size(shard)


def first_unsized(urls: list[str]) -> str | None:
    """The first shard whose size neither sizes.json nor a _stats.json gives; None if all are known."""
    sizes_cache: dict[Path, dict] = {}
    return next((url for url in urls if shard_size(Path(url), sizes_cache) is None), None)


def unsized_error(url: str) -> DataError:
    return DataError(f"cannot tell the dataset size: {url} has no entry in a sizes.json beside it and no "
                     f"_stats.json; set data.train_num_samples")


def count_samples(urls: list[str]) -> int | None:
    """The shards' total sample count (see shard_size); None if any shard's size is unknown."""
    sizes_cache: dict[Path, dict] = {}
    total = 0
    for url in urls:
        size = shard_size(Path(url), sizes_cache)
        if size is None:
            return None
        total += size
    return total
