"""Zero-shot multi-label classification: CLIP_benchmark's mean average precision (VOC2007
multilabel), and, as MERL reports ECG diagnoses, macro AUROC over classes and the macro F1 at each
class's best threshold.

Targets come from a sample's ``KEY.npy`` multi-hot vector in a CLIP_benchmark multilabel set,
else its ``KEY.json`` ``"labels"`` (a list of class indices) when present, else its single ``KEY.cls``. Scores are the zero-shot logits ``100 · f · W`` of
:func:`zeroshot.zeroshot_classifier`, so the classifier is the same as for single-label sets.
"""
from __future__ import annotations

import functools
import io
import json

import numpy as np
import torch

from .datasets import _shard_pipeline, decode_class_index, decode_media, map_examples
from .loading import EvalError
from .metrics import topk_accuracy
from .prompts import multilabel_recall
from .zeroshot import classify, zeroshot_classifier


def _multi_hot_vector(sample: dict, num_classes: int) -> torch.Tensor:
    vector = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    if vector.shape != (num_classes,):
        raise EvalError(f"sample {sample.get('__key__')}: .npy target of shape {vector.shape}, expected "
                        f"({num_classes},) for {num_classes} class names")
    return torch.from_numpy(vector.astype(np.float32))


def _multilabel_example(sample: dict, transform, num_classes: int, label_member: str = "cls"):
    if label_member == "npy":
        return transform(decode_media({k: v for k, v in sample.items() if k != "npy"})), _multi_hot_vector(
            sample, num_classes)
    labels = json.loads(sample["json"]).get("labels") if "json" in sample else None
    if labels is None:
        labels = [decode_class_index(sample)]
    if any(not 0 <= int(c) < num_classes for c in labels):
        raise EvalError(f"label out of range for {num_classes} classes in sample {sample.get('__key__')}: {labels}")
    target = torch.zeros(num_classes)
    target[[int(c) for c in labels]] = 1.0
    return transform(decode_media(sample)), target


def open_multilabel_set(source, transform, share=None):
    """Dataset yielding (signal tensor, multi-hot target (C,)), led by the global index with a share."""
    if not source.shards:
        raise EvalError("zeroshot_multilabel reads shards (KEY.npy, KEY.json labels or KEY.cls), not a folder")
    members = source.media + (source.label_member, "json")
    return map_examples(_shard_pipeline(source.shards, members, share),
                        functools.partial(_multilabel_example, transform=transform, num_classes=len(source.classnames),
                                          label_member=source.label_member), share)


def best_threshold_f1(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """max over thresholds t of F1 for predicting ``score >= t`` (one class; t runs over the scores)."""
    order = torch.argsort(scores, descending=True)
    sorted_scores, sorted_targets = scores[order], targets[order].double()
    true_positives = torch.cumsum(sorted_targets, 0)
    false_positives = torch.cumsum(1 - sorted_targets, 0)
    positives = sorted_targets.sum()
    # A threshold can only cut between different scores: keep the last position of each tie group.
    cut = torch.ones_like(sorted_scores, dtype=torch.bool)
    cut[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    f1 = 2 * true_positives / (true_positives + false_positives + positives)
    return float(f1[cut].max()) if positives > 0 else 0.0


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """CLIP_benchmark's multilabel metric: per class, the mean of the precision at the rank of each
    positive (scores sorted descending; ties in sort order), averaged over ALL classes (a class
    without positives counts 0)."""
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64)
    per_class = []
    for c in range(scores.shape[1]):
        truth = targets[torch.sort(scores[:, c], descending=True).indices, c].double()
        precision = truth.cumsum(0) / ranks
        per_class.append(precision[truth.bool()].sum() / max(float(truth.sum()), 1.0))
    return float(torch.stack(per_class).mean())


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, classnames=None) -> dict:
    """mean_average_precision (CLIP_benchmark's), and macro AUROC and macro best-threshold F1 over
    the classes that have positives and negatives; with `classnames`, also `per_class_recall` (a
    dict, see `prompts.multilabel_recall`, that result_record moves out of the metrics)."""
    scored = [c for c in range(targets.shape[1]) if 0 < targets[:, c].sum() < len(targets)]
    if not scored:
        raise EvalError("no class has both positive and negative samples: AUROC is undefined")
    from sklearn.metrics import roc_auc_score  # here: importing scikit-learn adds ~2 s to every clip-train start

    aurocs = [roc_auc_score(targets[:, c].numpy(), scores[:, c].numpy()) for c in scored]
    f1s = [best_threshold_f1(scores[:, c], targets[:, c]) for c in scored]
    result = {"mean_average_precision": mean_average_precision(scores, targets),
              "macro_auroc": sum(aurocs) / len(aurocs), "macro_f1": sum(f1s) / len(f1s), "classes_scored": len(scored)}
    if bool((targets.sum(1) == 1).all()):  # single-label set: accuracy is defined too
        result["acc1"] = topk_accuracy(scores, targets.argmax(1), 1)
    if classnames is not None:
        result["per_class_recall"] = multilabel_recall(classnames, scores, targets)
    return result


def zeroshot_multilabel(model, tokenizer, dataloader, classnames, templates, device, signal_dtype=None,
                        amp=False) -> dict:
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device, amp=amp)
    scores, targets = classify(model, classifier, dataloader, device, amp=amp, signal_dtype=signal_dtype)
    return multilabel_metrics(scores.float(), targets.float(), classnames)
