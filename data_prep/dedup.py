"""`clip-prep dedup`: drop exact and near-duplicate samples from a clip-prep folder.

A sample is compared with the samples kept before it, in shard and key order, so the first of a
group of duplicates is kept and every later one is removed, with the key of the kept sample it
repeats (removed.jsonl: reason exact_duplicate or near_duplicate, duplicate_of, and for near
duplicates the Hamming distance).

- Exact: the same sha256 of the source file (the `sha256` field `clip-prep shard` writes in
  KEY.json; for shards without it, the sha256 of the sample's members other than KEY.json).
- Near: imagehash's 64-bit perceptual hash (phash: DCT of the 32x32 greyscale image, each of
  the 8x8 lowest frequencies compared with their median) within a Hamming distance of
  --near-threshold BITS, inclusive: 0 removes only samples whose hashes are identical (the same
  picture re-encoded often hashes identically), the default 4 also catches small re-edits
  (JPEG quality, a few percent of scaling or brightness). Larger thresholds catch more
  re-edits but start to join distinct pictures that are simple or flat (drawings, sky).
  Samples without an image member (audio, ECG) and images that do not decode are only
  deduplicated exactly.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.curation import (CurationOutput, CurationSummary, input_shards, iter_samples,
                                note_unfinished_input, prepare_curation_output)

DEFAULT_NEAR_THRESHOLD = 4
# With the threshold d the 64 bits are cut into d + 1 bands (see NearIndex): past 16 the bands are
# 3 bits wide, nearly every pair of hashes shares one, and the search is as slow as comparing all.
MAX_NEAR_THRESHOLD = 16
HASH_BITS = 64
# JPEG can decode at 1/2, 1/4 or 1/8 scale for free; phash looks at 32x32 pixels, so a large
# image decoded at >= 256 pixels a side hashes the same way and several times faster.
DECODE_SIZE = (256, 256)


def perceptual_hash(data: bytes) -> int | None:
    """imagehash.phash of an encoded image as a 64-bit int; None when it does not decode."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("L", DECODE_SIZE)
            return int(str(imagehash.phash(image)), 16)
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a broken file; such a sample is not hashed
        return None


def _band_layout(threshold: int) -> list[tuple[int, int]]:
    """(shift, mask) of threshold + 1 bands that together cover the 64 bits, widths within 1."""
    bands, count, shift = [], threshold + 1, 0
    for index in range(count):
        width = HASH_BITS // count + (1 if index < HASH_BITS % count else 0)
        bands.append((shift, (1 << width) - 1))
        shift += width
    return bands


class NearIndex:
    """Kept hashes, searched by Hamming distance <= threshold without comparing with all of them.

    Pigeonhole: cut the 64 bits into threshold + 1 bands. Two hashes that differ in at most d bits
    differ in at most d bands, so with d + 1 bands at least one band is equal in both. Each band's
    value is a key of a dict; a query gathers the hashes that share any band with it and checks
    only those by exact distance. That finds every match (no false negatives), and for hashes that
    spread over their 2^width band values a query compares with about n * (d + 1) / 2^width
    hashes instead of n (for d = 4: bands of 12-13 bits, a few thousand times fewer).
    """

    def __init__(self, threshold: int):
        if not 0 <= threshold <= MAX_NEAR_THRESHOLD:
            raise ValueError(f"near threshold must be between 0 and {MAX_NEAR_THRESHOLD}, got {threshold}")
        self.threshold = threshold
        self._bands = _band_layout(threshold)
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._hashes: list[int] = []
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._hashes)

    def nearest(self, value: int) -> tuple[str, int] | None:
        """(key, distance) of the closest kept hash within the threshold (the earliest on a tie)."""
        candidates: set[int] = set()
        for (shift, mask), table in zip(self._bands, self._tables):
            candidates.update(table.get((value >> shift) & mask, ()))
        best = None
        for index in sorted(candidates):
            distance = (value ^ self._hashes[index]).bit_count()
            if distance <= self.threshold and (best is None or distance < best[1]):
                best = (index, distance)
        return None if best is None else (self._keys[best[0]], best[1])

    def add(self, value: int, key: str) -> None:
        index = len(self._hashes)
        self._hashes.append(value)
        self._keys.append(key)
        for (shift, mask), table in zip(self._bands, self._tables):
            table.setdefault((value >> shift) & mask, []).append(index)


@dataclass
class DedupCounts:
    inputs: int = 0
    hashed: int = 0           # samples with an image that decoded: checked for near duplicates too
    without_image: int = 0    # no image member: exact check only
    not_decoded: int = 0      # an image member that PIL could not read: exact check only


def run_dedup(source: Path, out_dir: Path, near_threshold: int, samples_per_shard: int, overwrite: bool,
              options: dict[str, Any]) -> CurationSummary:
    shards = input_shards(source)  # validates SHARDS before --out is touched
    note_unfinished_input(source, "dedup")
    prepare_curation_output(source, out_dir, overwrite)
    output = CurationOutput(out_dir, samples_per_shard)
    exact: dict[str, str] = {}  # content digest -> key of the kept sample
    near, counts = NearIndex(near_threshold), DedupCounts()
    for sample in iter_samples(shards):
        counts.inputs += 1
        digest = sample.content_digest()
        if digest in exact:
            output.remove(sample, "exact_duplicate", duplicate_of=exact[digest])
            continue
        value = _hash_of(sample, counts)
        match = near.nearest(value) if value is not None else None
        if match is not None:
            output.remove(sample, "near_duplicate", duplicate_of=match[0], distance=match[1])
            continue
        exact[digest] = sample.key
        if value is not None:
            near.add(value, sample.key)
        output.keep(sample)
    output.close_data()
    fields = {"near_threshold": near_threshold, "perceptual_hash": "imagehash.phash (64 bits)",
              "near_checked": counts.hashed, "exact_only": {"without_image": counts.without_image,
                                                            "not_decoded": counts.not_decoded},
              "options": options}
    summary = output.finish("dedup", source, counts.inputs, fields)
    print_dedup_report(summary, counts, near_threshold)
    return summary


def _hash_of(sample, counts: DedupCounts) -> int | None:
    image = sample.image()
    if image is None:
        counts.without_image += 1
        return None
    value = perceptual_hash(image)
    if value is None:
        counts.not_decoded += 1
    else:
        counts.hashed += 1
    return value


def print_dedup_report(summary: CurationSummary, counts: DedupCounts, near_threshold: int) -> None:
    by_reason = summary.removed_by_reason
    rows = [("inputs", summary.inputs), ("exact duplicates", by_reason.get("exact_duplicate", 0)),
            (f"near duplicates (phash distance <= {near_threshold})", by_reason.get("near_duplicate", 0)),
            ("kept", summary.kept)]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")
    exact_only = counts.without_image + counts.not_decoded
    if counts.hashed == 0:
        print("  no sample has a decodable image member: exact deduplication only")
    elif exact_only:
        print(f"  {exact_only} sample(s) checked for exact duplicates only ({counts.without_image} without an "
              f"image member, {counts.not_decoded} whose image did not decode)")
    print(summary.one_line())
    sys.stdout.flush()
