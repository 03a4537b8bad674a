"""CoCa's autoregressive captioning loss (teacher forcing), with a distributed token mean.

An open_clip CoCa model's ``forward(image, text)`` returns a dict with
``"logits"`` ``(B, T-1, V)`` -- the decoder's predictions from the tokens ``text[:, :-1]``
-- and ``"labels"`` ``(B, T-1)`` ``= text[:, 1:]``, the next tokens (only when
``output_labels=True``, the default).  The caption term is

    L_cap = -1/|M| sum_{(b, t) in M} log softmax(logits[b, t])[labels[b, t]],
    M = {(b, t) : labels[b, t] != pad_id},

exactly open_clip's ``CoCaLoss`` caption part, ``CrossEntropyLoss(ignore_index=pad_id)``
on ``logits.permute(0, 2, 1)`` (before its ``caption_loss_weight``; CoCa uses 2).

Distributed: every token's term is local (no ring).  With ``M_r`` this rank's targets and
``|M| = sum_r |M_r|`` (one ``all_reduce`` of a count), rank r returns

    L_r = W / |M| * sum_{(b,t) in M_r} CE(b, t),

so ``mean_r L_r`` is the full-batch token mean and, after gradient averaging, the update
equals the single-process one -- also when ranks hold different numbers of captions or
of non-padding tokens.  When every rank has the same token count this is the local mean
(what open_clip returns); with unequal counts the local mean would over-weight the ranks
with short captions, which the count all-reduce avoids.

Per-token terms are computed in the logits' dtype (as open_clip does; no float32 copy of
the ``B x T x V`` logits) and summed in float32 or wider.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .tiled_softmax import stat_dtype


def _global_count(local: torch.Tensor, group) -> Tuple[torch.Tensor, int]:
    """(global count, world size) of ``group`` (default world); ``(local, 1)`` if not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return local, 1
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return local, 1
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return total, world


def caption_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    pad_id: int = 0,
    group=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over non-padding targets (CoCa / open_clip ``CoCaLoss``).

    ``logits``: ``(B, T, V)``, ``labels``: ``(B, T)`` integer targets (from an open_clip CoCa
    forward: ``out["logits"]``, ``out["labels"]``).  Positions whose label is ``pad_id`` are
    ignored.  Distributed, rank r returns ``W/|M| x`` the sum over its tokens (``|M|`` the
    global count of non-padding targets), so the mean over ranks is the full-batch token
    mean for any per-rank sizes.  A batch with no target token gives 0 (open_clip: nan).
    Returns ``(loss, {"loss", "caption_tokens"})`` (detached; tokens = this rank's count).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    st = stat_dtype(logits.dtype)
    per_token = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=pad_id, reduction="none")
    n_local = (labels != pad_id).sum().to(st)
    n_total, world = _global_count(n_local, group)
    loss = per_token.sum(dtype=st) * (world / n_total.clamp(min=1))
    return loss, {"loss": loss.detach(), "caption_tokens": n_local.detach()}
