"""Pure tensor metrics for zero-shot classification and retrieval.

Definitions follow CLIP_benchmark 1.6.2 (`clip_benchmark/metrics/zeroshot_*.py`) so that numbers
are comparable with published tables; where its code fails or is undefined we say what we do
instead. Nothing here touches a model or a dataset.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# CLIP_benchmark scales cosine similarities by a fixed 100 (CLIP's learned scale saturates there)
# rather than the model's own logit_scale; top-k and argmax do not care, but we keep the same
# logits so that anyone inspecting them sees the same values.
CLASSIFICATION_LOGIT_SCALE = 100.0


def class_embedding(template_embeddings: torch.Tensor) -> torch.Tensor:
    """One class vector from the text embeddings (T, D) of its prompts.

    Each prompt embedding is L2-normalised, the T vectors averaged, and the mean normalised again,
    so every template carries equal weight whatever the norm the text tower produced.
    """
    mean = F.normalize(template_embeddings.float(), dim=-1).mean(dim=0)
    return mean / mean.norm()


def classification_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) from raw image features (N, D) and a classifier (D, C) of class vectors."""
    image_features = F.normalize(image_features.float(), dim=-1)
    return CLASSIFICATION_LOGIT_SCALE * image_features @ classifier.float()


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float | None:
    """Fraction of rows whose target is among the k largest logits.

    Returns None when k exceeds the number of classes: CLIP_benchmark reports NaN for acc5 with
    fewer than 5 classes (the metric is undefined there), and NaN is not valid JSON.
    """
    num_classes = logits.shape[1]
    if k > num_classes:
        return None
    top = logits.topk(k, dim=1, largest=True, sorted=True).indices
    hits = (top == targets.view(-1, 1)).any(dim=1)
    return hits.double().mean().item()  # float64: 222/360 is 0.6166666666666667, not 0.6166666746


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Balanced accuracy: the mean over classes present in `targets` of each class's recall.

    Matches `sklearn.metrics.balanced_accuracy_score`, which CLIP_benchmark calls: a class that is
    only ever predicted, never a target, has no recall and does not enter the mean.
    """
    recalls = []
    for cls in torch.unique(targets):
        of_class = targets == cls
        recalls.append((predictions[of_class] == cls).double().mean())
    return torch.stack(recalls).mean().item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """acc1, acc5 (None with fewer than 5 classes) and mean_per_class_recall."""
    if len(targets) == 0:
        raise ValueError("no samples to score")
    predictions = logits.argmax(dim=1)
    return {
        "acc1": topk_accuracy(logits, targets, 1),
        "acc5": topk_accuracy(logits, targets, 5),
        "mean_per_class_recall": mean_per_class_recall(predictions, targets),
    }


def _hits_at_k(scores: torch.Tensor, is_positive, k: int, chunk_size: int) -> torch.Tensor:
    """Per query (row of `scores`): is any positive among its k best candidates?

    `is_positive(rows, top_indices)` says, for each chosen candidate, whether it matches the query.
    k is clamped to the number of candidates: a query then sees every candidate, so it is a hit
    whenever it has a positive (CLIP_benchmark's `torch.topk` raises instead).
    """
    k = min(k, scores.shape[1])
    hits = []
    for start in range(0, scores.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, scores.shape[0]))
        top = scores[rows].topk(k, dim=1).indices
        hits.append(is_positive(rows, top).any(dim=1))
    return torch.cat(hits)


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_to_image: torch.Tensor,
    recall_k_list: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """CLIP-paper recall@k for both directions.

    image_embeddings (I, D) and text_embeddings (T, D) are L2-normalised; text_to_image (T,) gives
    the image index of each caption, so an image may own several captions.
    `image_retrieval_recall@k`: a caption query is a hit if its image is in its top k images.
    `text_retrieval_recall@k`: an image query is a hit if ANY of its captions is in its top k.
    Scores are computed once as texts @ images.T, as CLIP_benchmark does, so ties break alike.
    """
    text_to_image = text_to_image.long()
    scores = text_embeddings.float() @ image_embeddings.float().t()
    image_ids = torch.arange(image_embeddings.shape[0])

    def caption_hits(rows, top_images):
        return top_images == text_to_image[rows].view(-1, 1)

    def image_hits(rows, top_texts):
        return text_to_image[top_texts] == image_ids[rows].view(-1, 1)

    metrics = {}
    for k in recall_k_list:
        metrics[f"image_retrieval_recall@{k}"] = (
            _hits_at_k(scores, caption_hits, k, chunk_size).double().mean().item()
        )
        metrics[f"text_retrieval_recall@{k}"] = (
            _hits_at_k(scores.t(), image_hits, k, chunk_size).double().mean().item()
        )
    return metrics
