"""Naive full-matrix references for DCL, HN-NCE, uniformity and alignment (tests, benchmarks).

Written directly from the formulas (plain exp/log, no log-domain tricks, the ``B x B``
matrices built on purpose); single process, whole batch.  Use float64.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .reference import _metrics


def _off_diagonal(n, device):
    return ~torch.eye(n, dtype=torch.bool, device=device)


def naive_decoupled_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``L = 1/2 [mean_i (-S_ii + log sum_{j!=i} e^{S_ij}) + mean_j (-S_jj + log sum_{i!=j} e^{S_ij})]``."""
    S = logit_scale * image_features @ text_features.T
    E = torch.exp(S) * _off_diagonal(S.shape[0], S.device)
    diag = S.diagonal()
    loss = ((-diag + E.sum(1).log()).mean() + (-diag + E.sum(0).log()).mean()) / 2
    return loss, _metrics(loss, S)


def _hn_nce_rows(S, beta, alpha):
    """``mean_i [-S_ii + log(alpha e^{S_ii} + sum_{j!=i} w_ij e^{S_ij})]``,
    ``w_ij = e^{beta S_ij} / (1/(B-1) sum_{k!=i} e^{beta S_ik})``; weights not detached."""
    n = S.shape[0]
    off = _off_diagonal(n, S.device)
    Wb = torch.exp(beta * S) * off
    w = Wb / (Wb.sum(1, keepdim=True) / (n - 1))
    neg = (w * torch.exp(S) * off).sum(1)
    diag = S.diagonal()
    return (-diag + torch.log(alpha * torch.exp(diag) + neg)).mean()


def naive_hard_negative_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    beta_image: float = 0.5,
    beta_text: float = 0.5,
    alpha: float = 1.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DiHT HN-NCE, ``L = 1/2 [rows(S, beta_image) + rows(S^T, beta_text)]`` (see ``_hn_nce_rows``)."""
    S = logit_scale * image_features @ text_features.T
    loss = (_hn_nce_rows(S, beta_image, alpha) + _hn_nce_rows(S.T, beta_text, alpha)) / 2
    return loss, _metrics(loss, S)


def naive_uniformity_loss(features: torch.Tensor, t: float = 2.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``log( 1/(N(N-1)) sum_{i!=j} exp(-t ||x_i - x_j||^2) )`` with explicit differences."""
    n = features.shape[0]
    sq = (features[:, None, :] - features[None, :, :]).pow(2).sum(-1)
    total = (torch.exp(-t * sq) * _off_diagonal(n, features.device)).sum()
    loss = torch.log(total / (n * (n - 1)))
    return loss, {"loss": loss.detach()}


def naive_alignment_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, alpha: float = 2.0
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``1/B sum_i ||a_i - b_i||^alpha``."""
    d = image_features - text_features
    loss = (d * d).sum(1).pow(alpha / 2).mean() if alpha != 2 else (d * d).sum(1).mean()
    return loss, {"loss": loss.detach()}


__all__ = [
    "naive_decoupled_contrastive_loss",
    "naive_hard_negative_contrastive_loss",
    "naive_uniformity_loss",
    "naive_alignment_loss",
]
