"""One loader worker's raw sample stream: which shards it reads, in which order, and where it starts.

A rank's epoch is split over ``roles`` (the loader's worker count, at least one): role ``r`` reads
every ``roles``-th of the rank's shards and delivers batches ``r, r + roles, r + 2 roles, ...`` of the
epoch, which is the order in which torch's ``DataLoader`` takes batches from its workers. A run
resumed after ``k`` batches starts its worker 0 in role ``k mod roles``, so the batches still come in
the epoch's order.

Everything a role does is fixed by (seed, epoch, rank, role): its shard order, its shuffle, and each
sample's random draws, which ``sample_seed`` derives from (seed, epoch, shard, key) alone. So a role
resumes by dropping the samples it had already delivered as raw tar members, read but never decoded,
and goes on exactly where the interrupted run was.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import webdataset as wds

POSITION = "__position__"  # (role, raw samples this role has delivered, this one included)
SEED = "__seed__"  # the sample's own seed for every random draw made while decoding it


@dataclass(frozen=True)
class StreamPlan:
    """What every role of one rank reads in one epoch, and how much of it a resumed run has had."""

    urls: tuple[str, ...]
    weights: tuple[float, ...] | None  # per shard, for resampling (open_clip's upsampling factors)
    resampled: bool
    epoch_seed: int
    rank: int
    world_size: int
    roles: int
    role_offset: int  # the role of loader worker 0
    consumed: tuple[int, ...]  # per role: raw samples already delivered (dropped undecoded)
    batches: tuple[int, ...]  # per role: batches still to deliver this epoch
    shuffle_buffer: int


class SharedEpochPlan:
    """The part of a rank's ``StreamPlan`` that changes between epochs (seed, role offset, what a
    resumed run has had), in shared memory: persistent loader workers read each epoch's plan from
    it when a new epoch's iteration starts, so they are not re-spawned at every epoch boundary."""

    def __init__(self, template: StreamPlan):
        self.template = template
        self.values = torch.zeros(2 + 2 * template.roles, dtype=torch.int64).share_memory_()
        self.set(template)

    def set(self, plan: StreamPlan) -> None:
        """Called in the main process before the epoch's iteration starts (the workers read it then)."""
        if replace(plan, epoch_seed=0, role_offset=0, consumed=(), batches=()) != \
                replace(self.template, epoch_seed=0, role_offset=0, consumed=(), batches=()):
            raise ValueError("only the epoch seed, role offset, consumed and batches may change between epochs")
        self.values.copy_(torch.tensor([plan.epoch_seed, plan.role_offset, *plan.consumed, *plan.batches]))

    def current(self) -> StreamPlan:
        values = self.values.tolist()
        roles = self.template.roles
        return replace(self.template, epoch_seed=values[0], role_offset=values[1],
                       consumed=tuple(values[2:2 + roles]), batches=tuple(values[2 + roles:]))


def current_role(plan: StreamPlan) -> int:
    info = torch.utils.data.get_worker_info()
    return ((info.id if info is not None else 0) + plan.role_offset) % plan.roles


def role_shards(plan: StreamPlan, role: int) -> Iterator[tuple[int, int]]:
    """``(shard index in plan.urls, occurrence)`` in the order ``role`` reads them, forever: resampled,
    drawn with replacement (weighted); otherwise the role's shards again and again (the epoch is a
    number of batches, so bad samples make a role read into its next pass). The occurrence tells
    repeated reads of one shard apart."""
    if plan.resampled:
        rng = random.Random(f"shards/{plan.epoch_seed}/{plan.rank}/{role}")
        for occurrence in itertools.count():
            yield rng.choices(range(len(plan.urls)), weights=plan.weights)[0], occurrence
    order = list(range(len(plan.urls)))
    random.Random(f"shards/{plan.epoch_seed}").shuffle(order)  # the same order on every rank
    mine = order[plan.rank::plan.world_size][role::plan.roles]
    for occurrence in itertools.count():
        for index in mine:
            yield index, occurrence


def sample_seed(epoch_seed: int, shard: int, occurrence: int, key: str) -> int:
    """A sample's seed from who it is, not from what was read before it (a string hash that does not
    change between processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{epoch_seed}/{shard}/{occurrence}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def raw_samples(plan: StreamPlan, role: int, handler: Callable) -> Iterator[dict]:
    """The role's tar members grouped into samples (bytes only), each with its seed; it ends only
    when as many shards in a row as there are shards gave no sample (nothing left to read)."""
    expand = wds.tarfile_to_samples(handler=handler)
    empty_in_a_row = 0
    for shard, occurrence in role_shards(plan, role):
        found = 0
        for found, sample in enumerate(expand(iter([{"url": plan.urls[shard]}])), 1):
            sample[SEED] = sample_seed(plan.epoch_seed, shard, occurrence, sample.get("__key__", ""))
            yield sample
        empty_in_a_row = 0 if found else empty_in_a_row + 1
        if empty_in_a_row >= len(plan.urls):
            return


SHUFFLE_INITIAL = 100  # samples held before the first is released (webdataset's default too)


def shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """A buffer shuffle that starts early: once ``SHUFFLE_INITIAL`` samples are held each release
    picks a random one, and until the buffer holds ``bufsize`` two samples come in per release, so
    it grows to full size. Waiting for a full buffer first would read ``bufsize`` samples at every
    epoch start (the whole epoch when it is smaller than the buffer) before the first batch."""
    samples, buffer = iter(samples), []
    initial = min(SHUFFLE_INITIAL, bufsize)
    for sample in samples:
        buffer.append(sample)
        if len(buffer) < bufsize:
            buffer.extend(itertools.islice(samples, 1))
        if len(buffer) >= initial:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list, rng: random.Random):
    k = rng.randrange(len(buffer))
    buffer[k], buffer[-1] = buffer[-1], buffer[k]
    return buffer.pop()


def role_stream(plan: StreamPlan, role: int, handler: Callable) -> Iterator[dict]:
    """The samples ``role`` still has to deliver this epoch, each tagged with its position; those the
    interrupted run had already delivered are dropped here, before any decoder sees them."""
    rng = random.Random(f"shuffle/{plan.epoch_seed}/{plan.rank}/{role}")
    samples = shuffled(raw_samples(plan, role, handler), max(1, plan.shuffle_buffer), rng)
    for position, sample in enumerate(samples, 1):
        if position > plan.consumed[role]:
            sample[POSITION] = (role, position)
            yield sample


def seeded_call(seed: int, fn: Callable, *args):
    """``fn(*args)`` with torch's CPU generator seeded by ``seed`` and restored afterwards, so transforms
    that draw from it (random crops, gains, lead dropout) depend on the sample alone, and a loader in
    the main process leaves the training RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn(*args)
