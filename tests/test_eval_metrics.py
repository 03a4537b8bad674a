"""Eval metrics against examples small enough to count by hand."""
import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from clip_train.eval import metrics


def _logits_predicting(predictions, num_classes):
    """Logits whose argmax is `predictions` (the rest of the row is lower)."""
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 1.0
    return logits


def test_unbalanced_three_classes_acc1_and_mean_per_class_recall():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predictions = [0, 0, 0, 1, 1, 0, 1]
    result = metrics.classification_metrics(_logits_predicting(predictions, 3), targets)
    assert result["acc1"] == pytest.approx(4 / 7)
    # class 0: 3 of 4, class 1: 1 of 2, class 2: 0 of 1
    assert result["mean_per_class_recall"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert result["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, predictions))
    assert result["acc5"] is None  # undefined with fewer than 5 classes (CLIP_benchmark: NaN)


def test_class_only_predicted_never_a_target_is_left_out_of_recall_mean():
    targets = torch.tensor([0, 0, 1])
    predictions = torch.tensor([0, 2, 1])
    assert metrics.mean_per_class_recall(predictions, targets) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.warns(UserWarning):  # sklearn agrees, with a warning about class 2
        assert balanced_accuracy_score(targets, predictions) == pytest.approx(0.75)


def test_top1_and_top5_with_six_classes():
    descending = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    logits = descending.repeat(3, 1)
    targets = torch.tensor([4, 5, 0])  # ranked 5th (top-5 hit), 6th (miss), 1st (hit both)
    assert metrics.topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert metrics.topk_accuracy(logits, targets, 5) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(logits, targets, 7) is None


def test_class_embedding_is_normalised_mean_of_normalised_prompts():
    prompts = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # different norms must not weigh differently
    expected = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    assert torch.allclose(metrics.class_embedding(prompts), expected)


def test_classification_logits_use_fixed_scale_of_100_on_normalised_images():
    classifier = torch.eye(2)
    logits = metrics.classification_logits(torch.tensor([[3.0, 4.0]]), classifier)
    assert torch.allclose(logits, torch.tensor([[60.0, 80.0]]))


# Images are the unit vectors, so text row t of `TEXTS` is exactly its score row over the 3 images.
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])
TEXTS = torch.tensor(
    [
        [0.9, 0.1, 0.0],  # image 0: top1 hit
        [0.2, 0.7, 0.1],  # image 0: top1 is image 1 (miss), top2 hit
        [0.5, 0.3, 0.2],  # image 1: top1 is image 0 (miss), top2 hit
        [0.1, 0.2, 0.6],  # image 2: top1 hit
        [0.6, 0.25, 0.15],  # image 2: ranked last, miss at 1 and 2
    ]
)
# Image queries read the columns: image 0 -> text 0 first (its own: hit);
# image 1 -> text 1 (image 0's), then text 2 (its own): miss at 1, hit at 2;
# image 2 -> text 3 first (its own: hit).
EXPECTED_RETRIEVAL = {
    "image_retrieval_recall@1": 2 / 5,
    "text_retrieval_recall@1": 2 / 3,
    "image_retrieval_recall@2": 4 / 5,
    "text_retrieval_recall@2": 3 / 3,
}


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_retrieval_recall_with_several_captions_per_image(chunk_size):
    result = metrics.retrieval_metrics(torch.eye(3), TEXTS, TEXT_TO_IMAGE, (1, 2), chunk_size=chunk_size)
    assert result == pytest.approx(EXPECTED_RETRIEVAL)


def test_retrieval_k_beyond_candidates_is_a_certain_hit():
    result = metrics.retrieval_metrics(torch.eye(3), TEXTS, TEXT_TO_IMAGE, (10,))
    assert result == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}


def test_retrieval_matches_clip_benchmark_recall_definition():
    from clip_benchmark.metrics import zeroshot_retrieval as reference

    scores = TEXTS @ torch.eye(3).t()
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(5), TEXT_TO_IMAGE] = True
    for k in (1, 2, 3):
        ours = metrics.retrieval_metrics(torch.eye(3), TEXTS, TEXT_TO_IMAGE, (k,))
        image_hits = reference.recall_at_k(scores, positives, k) > 0
        text_hits = reference.recall_at_k(scores.t(), positives.t(), k) > 0
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(image_hits.float().mean().item())
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(text_hits.float().mean().item())
