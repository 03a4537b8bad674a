"""Naive full-matrix references (single process, whole batch): for tests and benchmarks.

They build the ``B x B`` logit matrix ``S = s A B^T (+ t)`` on purpose; use the tiled
losses for training.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def _metrics(loss: torch.Tensor, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    n = logits.shape[0]
    diag = logits.diagonal()
    n_neg = max(n * (n - 1), 1)
    return {
        "loss": loss.detach(),
        "pos_logit_mean": diag.detach().mean(),
        "neg_logit_mean": (logits.detach().sum() - diag.detach().sum()) / n_neg,
    }


def naive_softmax_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``L = 1/2 [CE(S, arange) + CE(S^T, arange)]`` with ``S = s A B^T``."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, _metrics(loss, logits)


def naive_sigmoid_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``L = -1/B sum_ij log sigmoid(z_ij (S_ij + t))``, ``z = 2I - 1``."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = logits.shape[0]
    z = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    loss = -F.logsigmoid(z * logits).sum() / n
    return loss, _metrics(loss, logits)
