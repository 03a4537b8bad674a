"""Zero-shot evaluation over every rank of a process group (the split is described in `sharding`).

Each rank scores its share with the single-process loops; the per-sample outputs are gathered with
their global indices, sorted back into file order, and rank 0 computes the metrics from them, which
every rank then returns. The metrics are those of a single-process run on the same data, up to the
float summation order of differently composed batches.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from clip_train.eval import metrics
from clip_train.eval.datasets import make_loader, open_classification_set, open_retrieval_set
from clip_train.eval.loading import EvalError
from clip_train.eval.multilabel import multilabel_metrics, open_multilabel_set
from clip_train.eval.retrieval import check_embedded, embed_batches
from clip_train.eval.sharding import (
    Share,
    cat_or_none,
    computed_on_main,
    gather_rows,
    run_collectively,
    without_indices,
)
from clip_train.eval.zeroshot import classification_result, score_batches, zeroshot_classifier


def _indexed_loader(dataset, batch_size: int, workers: int, sink: list):
    return without_indices(make_loader(dataset, batch_size, workers), sink)


def _in_file_order(index: torch.Tensor, *rows: torch.Tensor) -> list[torch.Tensor]:
    order = index.argsort()
    return [r[order] for r in rows]


# --- classification (single- and multi-label) ------------------------------------------------------


def _score_share(opener: Callable, model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype,
                 share: Share, amp: bool = False):
    """(global indices, logits, targets) of this rank's samples; all None for an empty share.

    The classifier is computed whole on every rank rather than sharded by class: it is small (one
    text pass per class) and every rank needs all of it to score its own images.
    """
    classifier = zeroshot_classifier(model, tokenizer, source.classnames, source.templates, device, amp=amp)
    sink: list[torch.Tensor] = []
    loader = _indexed_loader(opener(source, preprocess, share), batch_size, workers, sink)
    scored = score_batches(model, classifier, loader, device, amp=amp, signal_dtype=signal_dtype)
    logits, targets = scored if scored is not None else (None, None)
    return cat_or_none(sink), logits, targets


def _classification_metrics(source, index, logits, targets) -> dict:
    if index is None:
        raise EvalError("the classification dataset yielded no samples")
    return classification_result(*_in_file_order(index, logits, targets), source.classnames)


def _multilabel_metrics(source, index, scores, targets) -> dict:
    if index is None:
        raise EvalError("the classification dataset yielded no samples")
    scores, targets = _in_file_order(index, scores, targets)
    return multilabel_metrics(scores.float(), targets.float(), source.classnames)


# --- retrieval --------------------------------------------------------------------------------------


def _embed_share(model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype, share: Share,
                 amp: bool = False):
    """(global image indices, image embeddings, global image index of each caption, caption
    embeddings) of this rank's samples; None where it has none."""
    sink: list[torch.Tensor] = []
    loader = _indexed_loader(open_retrieval_set(source, preprocess, share), batch_size, workers, sink)
    images, texts, text_to_image = embed_batches(model, tokenizer, loader, device, amp=amp, signal_dtype=signal_dtype)
    image_index = cat_or_none(sink)
    text_image_index = None if texts is None else image_index[text_to_image]
    return image_index, images, text_image_index, texts


def _retrieval_metrics(source, image_index, images, text_image_index, texts) -> dict:
    """Images in file order; captions grouped by image in that order, each image's captions in
    their own order (a stable sort: they arrive contiguous and in order from the one rank that
    read the image) — exactly a single-process run's layout."""
    check_embedded(images, texts)
    image_index, image_order = image_index.sort()
    text_image_index, text_order = text_image_index.sort(stable=True)
    text_to_image = torch.searchsorted(image_index, text_image_index)
    return metrics.retrieval_metrics(images[image_order], texts[text_order], text_to_image)


# task name -> (score this rank's share, metrics from the gathered parts)
SHARDED_TASKS: dict[str, tuple[Callable, Callable]] = {
    "zeroshot_classification": (functools.partial(_score_share, open_classification_set), _classification_metrics),
    "zeroshot_multilabel": (functools.partial(_score_share, open_multilabel_set), _multilabel_metrics),
    "zeroshot_retrieval": (_embed_share, _retrieval_metrics),
}


def evaluate_sharded(task: str, resolved, model, preprocess, tokenizer, batch_size: int, workers: int, device,
                     signal_dtype, share: Share, amp: bool = False) -> dict:
    """`task` on already-resolved data, this rank scoring its share; called by every rank, returns
    the same metrics on every rank. A failure on any rank (a bad sample) raises on all."""
    score, compute = SHARDED_TASKS[task]
    parts = run_collectively(lambda: score(model, preprocess, tokenizer, resolved, batch_size, workers, device,
                                           signal_dtype, share, amp))
    gathered = [gather_rows(part) for part in parts]  # the same collectives, in the same order, on every rank
    return computed_on_main(lambda: compute(resolved, *gathered))
