"""Run items through a modality's encoder (in worker processes) into a DatasetWriter.

Workers decode/resize/encode; only the main process writes, consuming results in input
order, so shards and keys are identical whatever --workers is.
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import sys
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from data_prep.samples import EncodeResult, Modality, Rejection, SourceItem
from data_prep.writer import DatasetWriter, RunSummary

CHUNK_SIZE = 16
# Items handed to the pool at a time: bounds memory (Pool.imap would otherwise read the
# whole input ahead) while keeping every worker busy.
WINDOW_SIZE = 4096


class InputCounter:
    """Passes items through and counts them as the source hands them out."""

    def __init__(self, items: Iterable[SourceItem]):
        self._items = iter(items)
        self.count = 0

    def __iter__(self) -> "InputCounter":
        return self

    def __next__(self) -> SourceItem:
        item = next(self._items)
        self.count += 1
        return item


def process_item(item: SourceItem, encode: Callable, options: Any) -> tuple[SourceItem, EncodeResult]:
    """Encode one item; any unexpected failure becomes a rejection, never a crashed run."""
    if item.rejection is not None:
        return item, item.rejection
    try:
        return item, encode(item.path, item.caption, options)
    except Exception as error:
        return item, Rejection("unexpected_error", f"{type(error).__name__}: {error}")


def _windows(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    iterator = iter(items)
    while window := list(itertools.islice(iterator, size)):
        yield window


def encode_in_order(
    items: Iterable[SourceItem], work: Callable[[SourceItem], tuple], workers: int
) -> Iterator[tuple[SourceItem, EncodeResult]]:
    """Results in input order; with one worker everything stays in this process."""
    if workers <= 1:
        yield from map(work, items)
        return
    with multiprocessing.Pool(workers) as pool:
        for window in _windows(items, WINDOW_SIZE):
            yield from pool.imap(work, window, chunksize=CHUNK_SIZE)


def run_pipeline(
    items: Iterable[SourceItem],
    modality: Modality,
    options: Any,
    writer: DatasetWriter,
    workers: int,
    manifest_fields: dict[str, Any],
    total: int | None = None,
) -> RunSummary:
    """Encode and write every item, then finish the dataset (sizes, manifest).

    Inputs are counted as they leave the source, independently of the writer's own
    counts, so the final check written + rejected == inputs catches a result lost on the way.
    """
    counter = InputCounter(items)
    work = functools.partial(process_item, encode=modality.encode, options=options)
    results = encode_in_order(counter, work, workers)
    progress = tqdm(results, total=total, unit="sample", file=sys.stderr, disable=None, desc="clip-prep")
    for item, result in progress:
        if isinstance(result, Rejection):
            writer.reject(item.index, item.source, result)
        else:
            writer.write(item.index, result.members, {"source": item.source, **result.metadata, **(item.extra or {})})
    return writer.finish(counter.count, manifest_fields)
