"""Splitting an evaluation set over the ranks of a process group, and gathering results back.

In training every rank takes part in evaluation: one rank alone on a large eval set keeps the
others waiting in a collective until the job times out. Each rank therefore scores a disjoint share
of the samples; the per-sample outputs are gathered, put back in file order, and scored once.

The split, decided per dataset and the same on every rank (it depends only on the shard list):
- at least W shards: rank r reads shards r, r+W, r+2W, ... whole; no rank opens another's shards.
- fewer than W shards: every rank reads every shard but keeps sample p of shard s only when
  (s + p) % W == r (for one shard: position % W == rank). Other ranks' samples are dropped right
  after tar grouping, before anything decodes their media. The rotation by s spreads the
  remainders of several small shards over different ranks.
Either way every kept sample carries a global index s * SHARD_STRIDE + p, so gathered results can
be sorted back into file order: the order of a single-process evaluation with workers <= 1.

Failures: a rank that fails (a corrupt sample it alone decodes, say) must not leave the others
waiting in the gather, so the ranks agree on failures (`run_collectively`) before any gather.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from clip_train.eval.loading import EvalError

T = TypeVar("T")

INDEX_KEY = "__index__"  # added to a webdataset sample dict by the split stage
SHARD_STRIDE = 2**32  # global index = shard * SHARD_STRIDE + position in shard: unique and in file order


@dataclass(frozen=True)
class Share:
    """The part of the eval set that one rank scores: rank `rank` of `world` (world > 1)."""

    rank: int
    world: int


def current_share() -> Share | None:
    """This process's share when a process group of more than one rank is up, else None (the
    single-process path, unchanged)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Share(dist.get_rank(), world) if world > 1 else None


def is_main_rank() -> bool:
    """Whether this process writes the files of an evaluation: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --- the split (webdataset stages; module level so loader workers can pickle them) ---------------


def _rank_shards(src, share: Share):
    """Node splitter: this rank's whole shards (used when there are at least `world` shards)."""
    yield from itertools.islice(src, share.rank, None, share.world)


def _tag_and_split(src, shard_ids: dict[str, int], share: Share, split_samples: bool):
    """Give each grouped sample its global index; with `split_samples`, drop other ranks' samples.

    Runs before the example map, so a dropped sample is never decoded. Positions are counted per
    shard (a loader worker always reads a shard whole), so they do not depend on the worker count.
    """
    positions: dict[str, int] = {}
    for sample in src:
        url = sample["__url__"]
        position = positions.get(url, 0)
        positions[url] = position + 1
        shard = shard_ids[url]
        if split_samples and (shard + position) % share.world != share.rank:
            continue
        sample[INDEX_KEY] = shard * SHARD_STRIDE + position
        yield sample


def split_stages(urls: list[str], share: Share):
    """(node splitter or None, tag/split stage) for a webdataset over `urls`, for `share`."""
    by_shard = len(urls) >= share.world
    nodesplitter = functools.partial(_rank_shards, share=share) if by_shard else None
    tag = functools.partial(_tag_and_split, shard_ids={url: i for i, url in enumerate(urls)}, share=share,
                            split_samples=not by_shard)
    return nodesplitter, tag


def indexed_example(sample: dict, example: Callable) -> tuple:
    """(global index, *example(sample)): the index rides along through the loader."""
    return (sample[INDEX_KEY], *example(sample))


def collate_indexed(batch: list[tuple], collate: Callable | None = None) -> tuple:
    """(indices (B,), *collate(rest)) for a batch of `indexed_example` tuples."""
    indices = torch.tensor([item[0] for item in batch], dtype=torch.long)
    return (indices, *(collate or default_collate)([item[1:] for item in batch]))


class IndexedSubset(Dataset):
    """A map-style dataset's items index % world == rank, each as (index, *item); items of other
    ranks are never loaded (an ImageFolder decodes in __getitem__)."""

    def __init__(self, dataset, share: Share):
        self.dataset = dataset
        self.indices = range(share.rank, len(dataset), share.world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple:
        index = self.indices[i]
        return (index, *self.dataset[index])


def without_indices(loader, sink: list[torch.Tensor]):
    """The loader's batches without their leading indices, which are appended to `sink`; lets the
    single-process scoring loops run unchanged on an indexed loader."""
    for indices, *batch in loader:
        sink.append(indices)
        yield tuple(batch)


def cat_or_none(chunks: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(chunks) if chunks else None


# --- collectives ----------------------------------------------------------------------------------


def _failure_summary(exc: BaseException | None):
    return None if exc is None else (isinstance(exc, EvalError), f"{type(exc).__name__}: {exc}", str(exc))


def run_collectively(local: Callable[[], T]) -> T:
    """local() on every rank; if it raised on any rank, it raises on every rank.

    A failing rank re-raises its own error; the others raise the lowest failing rank's: the same
    one-line EvalError when that was one (bad data), else a RuntimeError naming the rank.
    """
    error, result = None, None
    try:
        result = local()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = exc
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, _failure_summary(error))
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            _raise_remote(rank, failure)
    return result


def _raise_remote(rank: int, failure: tuple):
    """Raise, here, the failure another rank summarised with `_failure_summary`."""
    is_eval_error, described, message = failure
    raise EvalError(message) if is_eval_error else RuntimeError(f"evaluation failed on rank {rank}: {described}")


def computed_on_main(compute: Callable[[], T]) -> T:
    """compute() on rank 0, its result (or error) broadcast: every rank returns the very same
    value, whatever float differences separate identical maths on different ranks."""
    box, error = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then re-raised
            error = exc
            box[0] = ("error", _failure_summary(exc))
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if error is not None:
        raise error
    if status == "ok":
        return payload
    _raise_remote(0, payload)


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo moves CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else torch.device("cpu")


def gather_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's `rows` (N_r, ...) concatenated in rank order, on the CPU, on every rank.

    A rank with nothing passes None. Row counts and shapes are exchanged first, then the tensors
    are padded to the largest count for all_gather. None when no rank had a row.
    """
    meta = [None] * dist.get_world_size()
    dist.all_gather_object(meta, None if rows is None else (len(rows), tuple(rows.shape[1:]), rows.dtype))
    present = [m for m in meta if m is not None]
    if not present or sum(m[0] for m in present) == 0:
        return None
    _, tail, dtype = present[0]
    counts = [0 if m is None else m[0] for m in meta]
    device = _comm_device()
    padded = torch.zeros((max(counts), *tail), dtype=dtype, device=device)
    if rows is not None:
        padded[: len(rows)] = rows.to(device)
    buckets = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(buckets, padded)
    return torch.cat([bucket[:count].cpu() for bucket, count in zip(buckets, counts)])
