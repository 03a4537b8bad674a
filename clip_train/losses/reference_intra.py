"""Naive references for the intra-modal and captioning terms (single process, whole batch).

Written directly from the formulas, building the full ``2N x 2N`` similarity on purpose;
for tests and benchmarks only.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def naive_nt_xent_loss(
    view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.1
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``L = -1/(2N) sum_i log( exp(z_i.z_p(i)/tau) / sum_{k != i} exp(z_i.z_k/tau) )``,
    ``z = normalize([view1; view2])``, ``p(i) = i +- N``."""
    z = F.normalize(torch.cat([view1, view2]), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.T
    eye = torch.eye(n2, dtype=torch.bool, device=z.device)
    logits = (sim / temperature).masked_fill(eye, float("-inf"))
    partner = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device)
    loss = -logits.log_softmax(1)[torch.arange(n2, device=z.device), partner].mean()
    pos = sim[torch.arange(n2, device=z.device), partner]
    neg_mask = ~eye
    neg_mask[torch.arange(n2, device=z.device), partner] = False
    n_neg = max(int(neg_mask.sum()), 1)
    return loss, {
        "loss": loss.detach(),
        "pos_sim_mean": pos.detach().mean(),
        "neg_sim_mean": sim.detach()[neg_mask].sum() / n_neg,
    }


def naive_caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean token cross-entropy over the targets that are not ``pad_id``:
    ``L = -1/|M| sum_{(b,t) in M} log softmax(logits[b, t])[labels[b, t]]``."""
    mask = labels != pad_id
    logp = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum() / mask.sum()
