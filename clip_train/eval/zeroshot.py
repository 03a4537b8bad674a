"""Zero-shot classification of an in-memory open_clip-style model (`encode_image`, `encode_text`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from clip_train.eval import metrics
from clip_train.eval.datasets import batches
from clip_train.eval.loading import EvalError
from clip_train.eval.prompts import single_label_recall


def autocast_context(device, amp: bool):
    """Mixed precision on the device's autocast type when asked, a no-op otherwise."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type)


def fill_template(template: str, classname: str) -> str:
    # str.replace rather than str.format: a template may hold other braces (e.g. JSON-ish text)
    return template.replace("{c}", classname)


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device, amp=False):
    """Classifier (D, C): column c is the normalised mean of the normalised embeddings of
    class c's prompts. Prompts are encoded one class at a time, as CLIP_benchmark does."""
    columns = []
    for classname in classnames:
        tokens = tokenizer([fill_template(t, classname) for t in templates]).to(device)
        with autocast_context(device, amp):
            embeddings = model.encode_text(tokens)
        columns.append(metrics.class_embedding(embeddings))
    return torch.stack(columns, dim=1)


def encode_signal(model, signals: torch.Tensor, device, signal_dtype=None) -> torch.Tensor:
    """Image/audio/ECG features in float32.

    The batch is cast to `signal_dtype` first when one is given: under bf16/fp16 training
    DeepSpeed has cast the towers' weights, and a conv or linear layer wants input of its weights'
    dtype. The features go back to float32 so that every metric is computed at full precision.
    """
    return model.encode_image(signals.to(device, dtype=signal_dtype)).float()


@torch.no_grad()
def score_batches(model, classifier: torch.Tensor, dataloader: Iterable, device, amp=False, signal_dtype=None):
    """(logits (N, C), targets) on the CPU for every sample of the loader, or None when it yields
    nothing (in a multi-rank evaluation a rank's share may be empty)."""
    all_logits, all_targets = [], []
    for images, targets in batches(dataloader):
        with autocast_context(device, amp):
            image_features = encode_signal(model, images, device, signal_dtype)
        all_logits.append(metrics.classification_logits(image_features, classifier).cpu())
        all_targets.append(torch.as_tensor(targets).cpu())
    if not all_logits:
        return None
    return torch.cat(all_logits), torch.cat(all_targets)


def classify(model, classifier: torch.Tensor, dataloader: Iterable, device, amp=False, signal_dtype=None):
    """(logits (N, C), targets (N,)) for every image of the loader, on the CPU."""
    scored = score_batches(model, classifier, dataloader, device, amp=amp, signal_dtype=signal_dtype)
    if scored is None:
        raise EvalError("the classification dataset yielded no samples")
    return scored


def classification_result(logits: torch.Tensor, targets: torch.Tensor, classnames: Sequence[str]) -> dict:
    """The metrics of `metrics.classification_metrics`, after checking every target is a class, and
    beside them `per_class_recall` (a dict, see `prompts.recall_table`: result_record moves it out of
    the metrics, run_training_eval leaves it out)."""
    num_classes = len(classnames)
    out_of_range = (targets < 0) | (targets >= num_classes)
    if out_of_range.any():
        raise EvalError(f"class index {int(targets[out_of_range][0])} out of range for {num_classes} class names")
    result = metrics.classification_metrics(logits, targets)
    result["per_class_recall"] = single_label_recall(classnames, logits.argmax(dim=1), targets)
    return result


def zeroshot_classification(model, tokenizer, dataloader, classnames, templates, device, amp=False,
                            signal_dtype=None) -> dict:
    """acc1, acc5 (None with fewer than 5 classes) and mean_per_class_recall over the loader, and
    per_class_recall (see classification_result)."""
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device, amp=amp)
    logits, targets = classify(model, classifier, dataloader, device, amp=amp, signal_dtype=signal_dtype)
    return classification_result(logits, targets, classnames)
