"""`clip-prep shard --distributor ray`: one Ray task per output shard.

The driver reads the input once, cuts it into the shards' fixed input ranges (see writer.py)
and sends each range to a task that downloads, encodes and writes that shard alone. A shard's
files depend on its inputs only, so a task that Ray re-runs after its worker died writes the same
bytes, and the output equals the local distributor's. The driver then checks the books and
writes rejects.jsonl, sizes.json and manifest.json exactly as a local job does.

Tasks write into --out directly: on a multi-machine cluster it must be a folder every node
mounts or an object store URL, and every node needs this package installed.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from data_prep.pipeline import InputCounter, process_chunk, process_item, write_result
from data_prep.samples import MissingToolError, SourceItem
from data_prep.store import Store
from data_prep.writer import RunSummary, ShardStats, ShardWriter, finish_dataset

TASK_RETRIES = 3  # re-runs of a shard whose worker process died
TASKS_PER_CPU = 2  # shards in flight per cluster CPU: enough to keep each busy, few items held


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What a task needs besides its inputs; plain data, so it pickles to any node."""

    out: Path | Store
    encode: Callable
    options: Any
    download_options: Any
    extra_columns: tuple[str, ...]
    threads: int


def prep_shard(job: ShardJob, shard_index: int, items: list[SourceItem]) -> dict:
    """Write one shard from its inputs (in a Ray worker); returns its stats."""
    writer = ShardWriter(job.out, shard_index, job.extra_columns)
    work = functools.partial(process_item, encode=job.encode, options=job.options,
                             download_options=job.download_options)
    for item, result in process_chunk(items, work, job.threads):
        write_result(writer, item, result)
    return writer.close().as_json()


def _absolute(item: SourceItem) -> SourceItem:
    """Workers may run in another folder (or on another node): give them absolute paths."""
    return item if item.path is None else dataclasses.replace(item, path=Path(item.path).absolute())


def shard_inputs(items: Iterable[SourceItem], samples_per_shard: int) -> Iterator[tuple[int, list[SourceItem]]]:
    """(shard index, its inputs) in order; inputs come in index order, so each shard's are consecutive."""
    for shard, group in itertools.groupby(items, key=lambda item: item.index // samples_per_shard):
        yield shard, [_absolute(item) for item in group]


def _use_token_if_available() -> None:
    """Send the cluster token when there is one, as Ray's own drivers do for address="auto": a
    cluster started with token authentication (`ray start`'s default) refuses a driver without it,
    and one without authentication accepts it."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _start_ray(address: str | None, cpus: int):
    if address:
        _use_token_if_available()  # before the import: Ray reads its settings then
    try:
        import ray
    except ImportError:
        raise MissingToolError("--distributor ray needs Ray: pip install 'clip-train[ray]' (or pip install ray)") from None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # a local cluster of --workers processes, gone when the job ends
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray


def run_ray(items: Iterable[SourceItem], job: ShardJob, samples_per_shard: int,
            complete: dict[int, ShardStats], manifest_fields: dict[str, Any],
            address: str | None, cpus: int) -> RunSummary:
    """Every shard not in `complete` as a Ray task; then finish the dataset as a local job does."""
    ray = _start_ray(address, cpus)
    try:
        task = ray.remote(max_retries=TASK_RETRIES)(prep_shard)
        job_ref = ray.put(job)
        shards = dict(complete)
        counter = InputCounter(items)
        limit = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", cpus)))
        in_flight: dict[Any, int] = {}
        progress = tqdm(unit="shard", file=sys.stderr, disable=None, desc="clip-prep (ray)")

        def collect(wait_for: int) -> None:
            done, _ = ray.wait(list(in_flight), num_returns=wait_for)
            for ref in done:
                shards[in_flight.pop(ref)] = ShardStats.from_json(ray.get(ref))
                progress.update()

        for shard, inputs in shard_inputs(counter, samples_per_shard):
            if shard in complete:
                continue
            if len(in_flight) >= limit:
                collect(1)
            in_flight[task.remote(job_ref, shard, inputs)] = shard
        while in_flight:
            collect(len(in_flight))
        progress.close()
    finally:
        ray.shutdown()
    return finish_dataset(job.out, shards, counter.count, samples_per_shard, manifest_fields)
