"""The linear-probe task: featurise the train (val) and test splits once, then fit the probe of
`linear_probe` on the cached features.

Features are the L2-normalised image embeddings, computed once per split. With a feature cache
folder they are stored there (one file per model, dataset and split) and reused by later runs, as
CLIP_benchmark's `--feature_root` does; a resumed suite then refits the probe without re-encoding.
In a process group every rank featurises its share of each split; the features are gathered in
file order and rank 0 fits the probe, whose metrics every rank returns.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from clip_train.eval.datasets import (
    ClassificationSource,
    as_request,
    batches,
    make_loader,
    open_classification_set,
    resolve_classification_set,
    split_request,
)
from clip_train.eval.linear_probe import Features, linear_probe, normalize_features
from clip_train.eval.loading import EvalError
from clip_train.eval.atomic import atomic_write
from clip_train.eval.sharding import Share, cat_or_none, computed_on_main, current_share, gather_rows, \
    is_main_rank, run_collectively, without_indices
from clip_train.eval.zeroshot import autocast_context, encode_signal


@dataclass(frozen=True)
class ProbeOptions:
    """The probe's settings, CLIP_benchmark's defaults (--fewshot_k -1, --fewshot_lr 0.1,
    --fewshot_epochs 10, --batch_size 64, --seed 0)."""

    fewshot_k: int = -1
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    val_proportion: float | None = None  # a share of train held out for the sweep when there is no val split


@dataclass
class ProbeSets:
    """The checked splits of a probe: train and test, and val when one is named."""

    train: ClassificationSource
    test: ClassificationSource
    val: ClassificationSource | None
    names: dict[str, str]  # split role -> the path or split it was read from, for the cache key


def resolve_probe_sets(dataset, templates_file=None) -> ProbeSets:
    """The test split of `dataset` and its train (and val) split from the same root; the train and
    val splits take the test split's class names when they carry none (clip-prep train shards)."""
    request = as_request(dataset, templates_file)
    test = resolve_classification_set(request)
    with_names = [split_request(request, split) for split in (request.train_split, request.val_split) if split]
    sources = [resolve_classification_set(dataclasses.replace(r, classnames=tuple(test.classnames)))
               for r in with_names]
    for role, source in zip(("train", "val"), sources):
        if len(source.classnames) != len(test.classnames):
            raise EvalError(f"the {role} split has {len(source.classnames)} class names, the test split "
                            f"{len(test.classnames)}: they must be the same classes")
    names = {"test": f"{request.path}:{request.split}"}
    names.update({role: f"{r.path}:{r.split}" for role, r in zip(("train", "val"), with_names)})
    return ProbeSets(sources[0], test, sources[1] if len(sources) > 1 else None, names)


@torch.no_grad()
def _featurise_loader(model, loader, device, amp: bool, signal_dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    features, targets = [], []
    for images, labels in batches(loader):
        with autocast_context(device, amp):
            features.append(normalize_features(encode_signal(model, images, device, signal_dtype)).cpu())
        targets.append(torch.as_tensor(labels).long().cpu())
    return (torch.cat(features), torch.cat(targets)) if features else None


def featurise(model, preprocess, source: ClassificationSource, batch_size: int, workers: int, device,
              amp: bool = False, signal_dtype=None, share: Share | None = None) -> Features:
    """L2-normalised features and targets of every sample of `source`, in file order; inside a
    process group each rank encodes its share and all return the whole split."""
    if share is None:
        loader = make_loader(open_classification_set(source, preprocess), batch_size, workers)
        encoded = _featurise_loader(model, loader, device, amp, signal_dtype)
        if encoded is None:
            raise EvalError("a linear-probe split yielded no samples")
        return Features(*encoded)
    sink: list[torch.Tensor] = []
    loader = without_indices(make_loader(open_classification_set(source, preprocess, share), batch_size, workers), sink)
    encoded = run_collectively(lambda: _featurise_loader(model, loader, device, amp, signal_dtype))
    index = gather_rows(cat_or_none(sink))
    features = gather_rows(None if encoded is None else encoded[0])
    targets = gather_rows(None if encoded is None else encoded[1])
    if index is None:
        raise EvalError("a linear-probe split yielded no samples")
    order = index.argsort()
    return Features(features[order], targets[order])


def _cache_file(cache_dir: Path, model_name: str, split_name: str) -> Path:
    digest = hashlib.sha1(f"{model_name}|{split_name}".encode()).hexdigest()[:16]
    return cache_dir / f"features_{digest}.pt"


def _cached_features(cache_dir, model_name, split_name, compute) -> Features:
    """compute() once; with a cache dir the features are stored there and read back next time."""
    if cache_dir is None:
        return compute()
    path = _cache_file(Path(cache_dir), model_name, split_name)
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        return Features(stored["features"], stored["targets"])
    features = compute()
    if is_main_rank():
        stored = {"features": features.features, "targets": features.targets, "split": split_name}
        atomic_write(path, lambda f: torch.save(stored, f), binary=True)
    return features


def _held_out(train: Features, proportion: float, seed: int) -> tuple[Features, Features]:
    """(train, val): a seeded random `proportion` of train held out for the weight-decay sweep."""
    if not 0 < proportion < 1:
        raise EvalError(f"--val-proportion must be between 0 and 1, got {proportion}")
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(seed))
    cut = int(round(len(order) * (1 - proportion)))
    keep, held = order[:cut].sort().values, order[cut:].sort().values
    return (Features(train.features[keep], train.targets[keep]), Features(train.features[held], train.targets[held]))


def run_linear_probe(model, preprocess, tokenizer, sets: ProbeSets, batch_size: int, workers: int, device,
                     signal_dtype=None, amp: bool = False, probe: ProbeOptions | None = None,
                     feature_cache=None, model_name: str = "", progress: bool = False) -> dict:
    """lp_acc1, lp_acc5, lp_mean_per_class_recall and the chosen weight_decay (see linear_probe)."""
    probe = probe or ProbeOptions()
    share = current_share()
    splits = {role: source for role, source in (("train", sets.train), ("val", sets.val), ("test", sets.test))
              if source is not None}
    features = {
        role: _cached_features(feature_cache, model_name, sets.names[role],
                               lambda s=source: featurise(model, preprocess, s, batch_size, workers, device, amp,
                                                          signal_dtype, share))
        for role, source in splits.items()
    }
    train, val = features["train"], features.get("val")
    if val is None and probe.val_proportion is not None:
        train, val = _held_out(train, probe.val_proportion, probe.seed)

    def fit():
        return linear_probe(train, features["test"], val, fewshot_k=probe.fewshot_k, lr=probe.lr,
                            epochs=probe.epochs, batch_size=probe.batch_size, seed=probe.seed, device=device,
                            amp=amp, progress=progress)

    return fit() if share is None else computed_on_main(fit)
