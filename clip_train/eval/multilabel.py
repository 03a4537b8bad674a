"""Zero-shot multi-label classification (ECG diagnoses, as MERL reports it): macro AUROC over
classes and the macro F1 at each class's best threshold.

Targets come from a sample's ``KEY.json`` ``"labels"`` (a list of class indices) when present,
else from its single ``KEY.cls``. Scores are the zero-shot logits ``100 · f · W`` of
:func:`zeroshot.zeroshot_classifier`, so the classifier is the same as for single-label sets.
"""
from __future__ import annotations

import functools
import json

import torch

from .datasets import MEDIA_EXTENSIONS, _shard_pipeline, decode_class_index, decode_media, map_examples
from .loading import EvalError
from .metrics import topk_accuracy
from .zeroshot import classify, zeroshot_classifier


def _multilabel_example(sample: dict, transform, num_classes: int):
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
        raise EvalError("zeroshot_multilabel reads clip-prep shards (KEY.json labels or KEY.cls), not a folder")
    return map_examples(_shard_pipeline(source.shards, MEDIA_EXTENSIONS + ("cls", "json"), share),
                        functools.partial(_multilabel_example, transform=transform, num_classes=len(source.classnames)),
                        share)


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


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """Macro AUROC and macro best-threshold F1 over the classes that have positives and negatives."""
    scored = [c for c in range(targets.shape[1]) if 0 < targets[:, c].sum() < len(targets)]
    if not scored:
        raise EvalError("no class has both positive and negative samples: AUROC is undefined")
    from sklearn.metrics import roc_auc_score  # here: importing scikit-learn adds ~2 s to every clip-train start

    aurocs = [roc_auc_score(targets[:, c].numpy(), scores[:, c].numpy()) for c in scored]
    f1s = [best_threshold_f1(scores[:, c], targets[:, c]) for c in scored]
    result = {"macro_auroc": sum(aurocs) / len(aurocs), "macro_f1": sum(f1s) / len(f1s),
              "classes_scored": len(scored)}
    if bool((targets.sum(1) == 1).all()):  # single-label set: accuracy is defined too
        result["acc1"] = topk_accuracy(scores, targets.argmax(1), 1)
    return result


def zeroshot_multilabel(model, tokenizer, dataloader, classnames, templates, device, signal_dtype=None) -> dict:
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device)
    scores, targets = classify(model, classifier, dataloader, device, signal_dtype=signal_dtype)
    return multilabel_metrics(scores.float(), targets.float())
