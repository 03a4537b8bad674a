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
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import webdataset as wds

from .shards import DataError, count_samples, expand_shards
from .modalities import MODALITIES, Modality
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
        # Random draws come from torch's generator, which the loader seeds per epoch and worker,
        # so a resumed run replays them.
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
        batch = {"skipped": self.counter.take()}
        for name in samples[0]:
            if name.startswith("__"):  # webdataset's __key__/__url__ bookkeeping
                continue
            values = [s[name] for s in samples]
            if name == "caption":
                batch["text"] = self.tokenizer(values)
            elif name.startswith("text_view"):
                batch[name] = self.tokenizer(values)
            else:
                batch[name] = torch.stack(values)
        return batch


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

    def _media_exts(self) -> list[str]:
        return self.cfg.media_key.split(";") if self.cfg.media_key else list(self.modality.extensions)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The batches of ``epoch``, after the first ``skip`` (a resumed run fast-forwards to its position).

        Every shuffle and the workers' augmentation seeds derive from (seed, epoch, rank), so an
        epoch reads the same batches whether or not the run was interrupted.
        """
        epoch_seed = self.seed * 1_000_003 + epoch
        loader = wds.WebLoader(self._pipeline(epoch_seed), batch_size=None, shuffle=False, num_workers=self.workers,
                               generator=torch.Generator().manual_seed(epoch_seed * 1009 + self.rank))
        batches = iter(loader)
        for _ in itertools.islice(batches, skip):  # eagerly, so the caller can restore RNG state afterwards
            pass
        return itertools.islice(batches, self.batches_per_epoch - skip)

    def _pipeline(self, epoch_seed: int) -> wds.DataPipeline:
        cfg, counter = self.cfg, SkipCounter()
        if cfg.resampled:
            source = [wds.ResampledShards(self.urls, seed=epoch_seed, deterministic=True)]
        else:
            source = [wds.SimpleShardList(self.urls),
                      wds.detshuffle(bufsize=len(self.urls), initial=len(self.urls), seed=epoch_seed),
                      wds.split_by_node, wds.split_by_worker]
        return wds.DataPipeline(
            *source,
            wds.tarfile_to_samples(handler=counter.handler),
            wds.detshuffle(bufsize=cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100),
                           seed=epoch_seed + 7919 * self.rank),
            wds.map(SampleDecoder(self.modality, self._media_exts(), cfg.text_key, self.transform, self.views,
                                  self.word_dropout), handler=counter.handler),
            wds.batched(cfg.batch_size, collation_fn=Collate(self.tokenizer, counter), partial=False),
        ).with_epoch(nbatches=math.ceil(self.batches_per_epoch / max(1, self.workers)))


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
    urls = expand_shards(cfg.train)
    num_samples = cfg.train_num_samples or count_samples(urls)
    if not num_samples:
        raise DataError("cannot tell the dataset size: no sizes.json next to the shards; set data.train_num_samples")
    batches = num_samples // (cfg.batch_size * world_size)
    if batches == 0:
        raise DataError(f"{num_samples} samples give no full batch of {cfg.batch_size} x {world_size} ranks: "
                        f"lower data.batch_size")
    workers = _check_split(urls, cfg.workers, world_size, cfg.resampled)
    return TrainData(cfg, urls, transform, tokenizer, seed, rank, workers, num_samples, batches,
                     frozenset(views), word_dropout, MODALITIES.get(modality))
