"""Run items through a modality's encoder (in worker processes) into a DatasetWriter.

Workers decode/resize/encode; only the main process writes, consuming results in input
order, so shards and keys are identical whatever --workers is.
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import sys
from concurrent.futures import ThreadPoolExecutor
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


def process_item(item: SourceItem, encode: Callable, options: Any,
                 download_options: Any = None) -> tuple[SourceItem, EncodeResult]:
    """Download (for a URL input) and encode one item; any unexpected failure becomes a
    rejection, never a crashed run."""
    if item.rejection is not None:
        return item, item.rejection
    try:
        media = item.path
        if item.url is not None:
            from data_prep.download import DownloadOptions, fetch

            media = fetch(item.url, download_options or DownloadOptions())
            if isinstance(media, Rejection):
                return item, media
        return item, encode(media, item.caption, options)
    except Exception as error:
        return item, Rejection("unexpected_error", f"{type(error).__name__}: {error}")


def process_chunk(items: list[SourceItem], work: Callable, threads: int) -> list[tuple]:
    """A chunk's results in order, `threads` items at a time: downloads wait on the network, so
    a process keeps several in flight (as img2dataset's thread_count does)."""
    if threads <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, items))


def _windows(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    iterator = iter(items)
    while window := list(itertools.islice(iterator, size)):
        yield window


def encode_in_order(
    items: Iterable[SourceItem], work: Callable[[SourceItem], tuple], workers: int, threads: int = 1
) -> Iterator[tuple[SourceItem, EncodeResult]]:
    """Results in input order; with one worker everything stays in this process. With threads > 1
    each process works on chunks of items with that many threads."""
    if threads > 1:
        chunk_work = functools.partial(process_chunk, work=work, threads=threads)
        chunks = _windows(items, CHUNK_SIZE * threads)
        if workers <= 1:
            for chunk in chunks:
                yield from chunk_work(chunk)
            return
        with multiprocessing.Pool(workers) as pool:
            for window in _windows(chunks, max(1, WINDOW_SIZE // (CHUNK_SIZE * threads))):
                for results in pool.imap(chunk_work, window):
                    yield from results
        return
    if workers <= 1:
        yield from map(work, items)
        return
    with multiprocessing.Pool(workers) as pool:
        for window in _windows(items, WINDOW_SIZE):
            yield from pool.imap(work, window, chunksize=CHUNK_SIZE)


def record_fields(item: SourceItem) -> dict[str, Any]:
    """What the source knows of an input, for its KEY.json or parquet row: url, caption, extra columns."""
    fields = {"url": item.url} if item.url is not None else {}
    return {**fields, "caption": item.caption, **(item.extra or {})}


def write_result(writer, item: SourceItem, result: EncodeResult) -> None:
    """One result into a DatasetWriter or ShardWriter."""
    if isinstance(result, Rejection):
        writer.reject(item.index, item.source, result, record_fields(item))
    else:
        origin = {"url": item.url} if item.url is not None else {}
        writer.write(item.index, result.members, {"source": item.source, **origin, **result.metadata, **(item.extra or {})})


def run_pipeline(
    items: Iterable[SourceItem],
    modality: Modality,
    options: Any,
    writer: DatasetWriter,
    workers: int,
    manifest_fields: dict[str, Any],
    total: int | None = None,
    threads: int = 1,
    download_options: Any = None,
) -> RunSummary:
    """Encode and write every item, then finish the dataset (sizes, manifest).

    Inputs are counted as they leave the source, independently of the writer's own
    counts, so the final check written + rejected == inputs catches a result lost on the way.
    The inputs of shards a resumed job kept are counted and passed over.
    """
    counter = InputCounter(items)
    done = set(writer.shards)
    pending = (item for item in counter if writer.shard_of(item.index) not in done)
    work = functools.partial(process_item, encode=modality.encode, options=options, download_options=download_options)
    results = encode_in_order(pending, work, workers, threads)
    progress = tqdm(results, total=total, unit="sample", file=sys.stderr, disable=None, desc="clip-prep")
    for item, result in progress:
        write_result(writer, item, result)
    return writer.finish(counter.count, manifest_fields)
