"""Multi-label zero-shot metrics (ECG): macro AUROC as sklearn computes it, best-threshold F1 by brute force."""
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from clip_train.eval.loading import EvalError
from clip_train.eval.multilabel import best_threshold_f1, multilabel_metrics


def brute_force_best_f1(scores, targets):
    return max(f1_score(targets.numpy(), (scores >= t).numpy().astype(int), zero_division=0) for t in scores)


def test_best_threshold_f1_matches_brute_force_with_ties():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 6, (30,), generator=generator).float()  # many ties
        targets = (torch.rand(30, generator=generator) < 0.3).float()
        if targets.sum() == 0:
            continue
        assert best_threshold_f1(scores, targets) == pytest.approx(brute_force_best_f1(scores, targets))


def test_macro_auroc_and_f1_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.1, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    result = multilabel_metrics(scores, targets)
    # class 0 separates perfectly (AUROC 1, F1 1); class 1: positives 0.7, 0.6 vs negatives 0.1, 0.3 -> also 1
    assert result["macro_auroc"] == pytest.approx(1.0) and result["macro_f1"] == pytest.approx(1.0)
    assert "acc1" not in result  # a multi-label target: accuracy is not defined
    targets[1, 1], scores[3, 1] = 0.0, 0.65
    expected = (roc_auc_score(targets[:, 0], scores[:, 0]) + roc_auc_score(targets[:, 1], scores[:, 1])) / 2
    assert multilabel_metrics(scores, targets)["macro_auroc"] == pytest.approx(expected)


def test_single_label_targets_also_report_accuracy_and_skip_unscorable_classes():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5]])
    targets = torch.eye(3)[[0, 1, 1]]  # class 2 has no positive: AUROC undefined, skipped
    result = multilabel_metrics(scores, targets)
    assert result["classes_scored"] == 2 and result["acc1"] == pytest.approx(2 / 3)
    with pytest.raises(EvalError, match="AUROC is undefined"):
        multilabel_metrics(scores, torch.ones(3, 3))
