"""The training data path: shards -> split by node and worker -> shuffle -> decode -> batch dict.

Only the signal member (image, audio or ECG, see ``modalities``) and the caption are decoded: pickled
members such as ``.pyd`` are never unpickled. A sample that fails to read or decode is skipped and
counted; every batch carries the number of samples its worker skipped since the previous batch.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import webdataset as wds

from .shards import DataError, count_samples, expand_weighted_shards, first_unsized, unsized_error
from .modalities import MODALITIES, Modality
from .stream import POSITION, SEED, SharedEpochPlan, StreamPlan, current_role, role_stream, seeded_call
from .text_views import two_text_views

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts samples dropped by a webdataset handler in this worker; warns for the first few."""

    def __init__(self, warn_first: int = 5):
        self.skipped = 0
        self.reported = 0
        self.warn_first = warn_first

    def handler(self, exn: Exception) -> bool:
        self.skipped += 1
        if self.skipped <= self.warn_first:
            log.warning("skipping a bad sample (%s: %s)", type(exn).__name__, exn)
        return True  # keep going

    def take(self) -> int:
        """Skips since the previous call."""
        delta, self.reported = self.skipped - self.reported, self.skipped
        return delta


IMAGE_VIEW2 = "image_view2"
TEXT_VIEWS = "text_views"


class SampleDecoder:
    """Turn a raw webdataset sample into a dict: the signal under the modality's name (``image``,
    ``audio``, ``ecg``) and ``caption``, plus the second views that intra-modal loss terms ask for
    (``<modality>_view2``: the signal transformed again; ``text_view1``/``text_view2``: two captions,
    or two word-dropout copies of one)."""

    def __init__(self, modality: Modality, media_exts: list[str], text_ext: str, transform: Callable,
                 views: frozenset = frozenset(), word_dropout: float = 0.1):
        self.modality = modality
        self.media_exts = media_exts
        self.text_ext = text_ext
        self.transform = transform
        self.views = views
        self.word_dropout = word_dropout

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        media = next((sample[e] for e in self.media_exts if e in sample), None)
        if media is None:
            raise ValueError(f"sample {key} has no {self.modality.name} member ({', '.join(self.media_exts)})")
        if self.text_ext not in sample:
            raise ValueError(f"sample {key} has no .{self.text_ext} caption")
        captions = [line.strip() for line in sample[self.text_ext].decode("utf-8").splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"sample {key} has an empty caption")
        return {**seeded_call(sample[SEED], self._decode, media, captions), POSITION: sample[POSITION]}

    def _decode(self, media: bytes, captions: list[str]) -> dict:
        # Every draw (caption choice, word dropout, the transform's crops) comes from the sample's own
        # seed: a resumed run that never decoded the samples before it draws the same.
        rng = random.Random(int(torch.randint(2**62, (1,))))
        decoded = {"caption": rng.choice(captions)}
        signal = self.modality.decode(media)
        decoded[self.modality.name] = self.transform(signal)
        if IMAGE_VIEW2 in self.views:
            decoded[f"{self.modality.name}_view2"] = self.transform(signal)
        if TEXT_VIEWS in self.views:
            decoded["text_view1"], decoded["text_view2"] = two_text_views(captions, self.word_dropout, rng)
        return decoded


class Collate:
    """Stack images, tokenize captions, attach the worker's skip count."""

    def __init__(self, tokenizer: Callable, counter: SkipCounter):
        self.tokenizer = tokenizer
        self.counter = counter

    def __call__(self, samples: list[dict]) -> dict:
        # position: (role, raw samples the role has delivered), what a checkpoint records to resume from
        batch = {"skipped": self.counter.take(), "position": samples[-1][POSITION]}
        for name in samples[0]:
            if name.startswith("__"):  # bookkeeping: __key__, __url__, __seed__, __position__
                continue
            values = [s[name] for s in samples]
            if name == "caption":
                batch["text"] = self.tokenizer(values)
            elif name.startswith("text_view"):
                batch[name] = self.tokenizer(values)
            else:
                batch[name] = torch.stack(values)
        return batch


class EpochStream(torch.utils.data.IterableDataset):
    """What one loader worker delivers: its role's samples, decoded and batched (see ``stream``), for
    the epoch the shared plan describes when the iteration starts."""

    def __init__(self, plan: SharedEpochPlan, decoder: SampleDecoder, batch_size: int, tokenizer: Callable):
        self.plan, self.decoder, self.batch_size, self.tokenizer = plan, decoder, batch_size, tokenizer

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan.current()
        counter, role = SkipCounter(), current_role(plan)
        samples = role_stream(plan, role, counter.handler)
        decoded = wds.map(self.decoder, handler=counter.handler)(samples)
        collate = Collate(self.tokenizer, counter)
        # Full batches only, each made as soon as its last sample is decoded (no look-ahead decode).
        batches = (collate(group) for group in iter(lambda: list(itertools.islice(decoded, self.batch_size)), [])
                   if len(group) == self.batch_size)
        return itertools.islice(batches, plan.batches[role])


@dataclass
class TrainData:
    """An epoch is ``batches_per_epoch`` batches on every rank, in an order fixed by (seed, epoch, rank)."""

    cfg: object  # DataConfig
    urls: list[str]
    transform: Callable
    tokenizer: Callable
    seed: int
    rank: int
    workers: int
    num_samples: int
    batches_per_epoch: int
    views: frozenset = frozenset()  # IMAGE_VIEW2 and/or TEXT_VIEWS, when a loss term needs them
    word_dropout: float = 0.1
    modality: Modality = MODALITIES.get("image")
    world_size: int = 1
    weights: list[float] | None = None  # per shard, with resampling
    # Built at the first epoch and kept: its workers persist and read each epoch's plan from shared memory.
    _loader: torch.utils.data.DataLoader | None = field(default=None, init=False, repr=False)

    @property
    def roles(self) -> int:
        """Independent sample streams per rank: one per loader worker (one in the main process)."""
        return max(1, self.workers)

    def _media_exts(self) -> list[str]:
        return self.cfg.media_key.split(";") if self.cfg.media_key else list(self.modality.extensions)

    def epoch_batches(self, epoch: int, skip: int = 0, consumed: dict[int, int] | None = None) -> Iterator[dict]:
        """The batches of ``epoch`` after the first ``skip``, for a resumed run.

        The skipped samples are dropped as raw tar members, never decoded. ``consumed`` maps each
        role to the raw samples it had delivered (the ``position`` of its last batch, which also
        counts samples that failed to decode); without it each role's share of ``skip`` batches is
        taken as full batches of good samples.
        """
        if skip >= self.batches_per_epoch:
            return iter(())
        roles, batch = self.roles, self.cfg.batch_size
        delivered = [len(range(role, skip, roles)) for role in range(roles)]  # batches r, r + roles, ... < skip
        consumed = consumed or {role: n * batch for role, n in enumerate(delivered) if n}
        per_role = math.ceil(self.batches_per_epoch / roles)
        epoch_seed = self.seed * 1_000_003 + epoch
        plan = StreamPlan(tuple(self.urls), tuple(self.weights) if self.weights else None, self.cfg.resampled,
                          epoch_seed, self.rank, self.world_size, roles, role_offset=skip % roles,
                          consumed=tuple(consumed.get(role, 0) for role in range(roles)),
                          batches=tuple(per_role - n for n in delivered), shuffle_buffer=self.cfg.shuffle_buffer)
        return itertools.islice(self._loader_for(plan), self.batches_per_epoch - skip)

    def _loader_for(self, plan: StreamPlan) -> torch.utils.data.DataLoader:
        """The one loader of this run, its shared plan set to ``plan`` (iterate it right after)."""
        if self._loader is None:
            decoder = SampleDecoder(self.modality, self._media_exts(), self.cfg.text_key, self.transform, self.views,
                                    self.word_dropout)
            stream = EpochStream(SharedEpochPlan(plan), decoder, self.cfg.batch_size, self.tokenizer)
            self._loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                       persistent_workers=self.workers > 0)
        self._loader.dataset.plan.set(plan)
        return self._loader


def _check_split(urls: list[str], workers: int, world_size: int, resampled: bool) -> int:
    """Each rank and worker reads disjoint shards; return a worker count that keeps them all busy."""
    if resampled:
        return workers
    if len(urls) < world_size:
        raise DataError(f"{len(urls)} shard(s) cannot be split over {world_size} ranks: set data.resampled=true "
                        f"or reshard with a smaller --samples-per-shard")
    usable = max(1, len(urls) // world_size)
    if workers > usable:
        log.warning("data.workers=%d but only %d shard(s) per rank: using %d worker(s)", workers, usable, usable)
        return usable
    return workers


def build_train_data(cfg, transform: Callable, tokenizer: Callable, *, seed: int, rank: int = 0,
                     world_size: int = 1, views: frozenset = frozenset(), word_dropout: float = 0.1,
                     modality: str = "image") -> TrainData:
    """``cfg`` is the ``DataConfig``. An epoch is ``train_num_samples`` (or the shards' total) samples."""
    urls, weights = expand_weighted_shards(cfg.train, cfg.train_weights)
    num_samples = cfg.train_num_samples or count_samples(urls)
    if not num_samples:
        raise unsized_error(first_unsized(urls))
    batches = num_samples // (cfg.batch_size * world_size)
    if batches == 0:
        raise DataError(f"{num_samples} samples give no full batch of {cfg.batch_size} x {world_size} ranks: "
                        f"lower data.batch_size")
    workers = _check_split(urls, cfg.workers, world_size, cfg.resampled)
    return TrainData(cfg, urls, transform, tokenizer, seed, rank, workers, num_samples, batches,
                     frozenset(views), word_dropout, MODALITIES.get(modality), world_size, weights)
