"""Embedding-geometry terms (Wang & Isola): uniformity (tiled, ring-distributed) and alignment.

Uniformity of the GLOBAL set ``x_1..x_N`` (every rank's rows), with ``t > 0``:

    U(x) = log( 1/(N(N-1)) sum_{i != j} exp(K_ij) ),   K_ij = -t ||x_i - x_j||^2
         = -t (||x_i||^2 + ||x_j||^2 - 2 x_i.x_j)        (no unit-norm assumption).

Forward: one ring pass; rank ``r`` merges ``lse_{j != i} K_ij`` of its rows over every
visiting block (diagonal masked inside the tiles that hold it), then the per-rank
log-sum-exps are all-gathered and merged: ``LSE = lse_{i != j} K_ij``, ``U = LSE - log(N(N-1))``.

Distributed share: ``U`` is a log of a global mean, not a sum of per-row terms, so every
rank returns the full value ``U`` (the mean over ranks is trivially ``U``).  The backward
differentiates ``sum_r g_r L_r = (sum_r g_r) U``: with ``P_ij = exp(K_ij - LSE)`` (symmetric),

    dU/dx_i = -4t sum_{j != i} P_ij (x_i - x_j) = -4t (rho_i x_i - sum_j P_ij x_j),
    rho_i = sum_{j != i} P_ij,

scaled by ``sum_r g_r`` (all-gathered).  With ``g_r = 1`` a rank's row gradients are
``W x`` the single-process ones, the engine's convention.  Since ``P`` is symmetric each
rank gets its rows' gradient from its own row-wise pass: no accumulator travels.
Memory ``O(T^2 + b D)``.

Alignment ``A = 1/B sum_i ||a_i - b_i||^alpha`` pairs rows on the same rank: rank ``r``
returns ``W/B sum_{i in r} ||a_i - b_i||^alpha`` (mean over ranks = ``A``; plain autograd
then gives the ``W x`` row gradients).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .ring import DEFAULT_EXCHANGE_MEMORY_MB, Ring, make_ring, pass_row_bytes, ring_loop
from .tiled_softmax import acc_mm, scaled_logits, stat_dtype, tile_ranges

NEG_INF = float("-inf")


def _sq_norms(x, st):
    x = x.to(st)
    return (x * x).sum(1)


def _kernel(xi, xj, ni, nj, t: float, st):
    """``K = -t (n_i + n_j - 2 x_i.x_j)`` for one tile, in ``st``."""
    K = scaled_logits(xi, xj, 2.0 * t, st)
    return K.sub_(ni[:, None], alpha=t).sub_(nj[None, :], alpha=t)


class _TiledUniformity(torch.autograd.Function):
    """Returns the full ``U`` on every rank; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, x, t: float, tile: int, ring: Ring):
        st = stat_dtype(x.dtype)
        n_loc = _sq_norms(x, st)
        row_lse = torch.full((x.shape[0],), NEG_INF, dtype=st, device=x.device)

        def step(q, blk, _acc):
            xb = blk[0]
            nb = _sq_norms(xb, st)
            for j0, j1 in tile_ranges(xb.shape[0], tile):
                for i0, i1 in tile_ranges(x.shape[0], tile):
                    K = _kernel(x[i0:i1], xb[j0:j1], n_loc[i0:i1], nb[j0:j1], t, st)
                    if q == ring.rank:
                        K.diagonal(i0 - j0).fill_(NEG_INF)
                    torch.logaddexp(row_lse[i0:i1], K.logsumexp(1), out=row_lse[i0:i1])

        ring_loop(ring, [x], [], step)
        lse = ring.gather_scalar(row_lse.logsumexp(0)).logsumexp(0)
        n = ring.total
        ctx.save_for_backward(x, lse)
        ctx.t, ctx.tile, ctx.ring = t, tile, ring
        return lse - math.log(n * (n - 1))

    @staticmethod
    def backward(ctx, g):
        x, lse = ctx.saved_tensors
        ring, t, tile, st = ctx.ring, ctx.t, ctx.tile, lse.dtype
        g_sum = ring.gather_scalar(g.to(st)).sum()  # a device scalar, no host read
        n_loc = _sq_norms(x, st)
        rho = torch.zeros(x.shape[0], dtype=st, device=x.device)
        px = torch.zeros(x.shape, dtype=st, device=x.device)

        def step(q, blk, _acc):
            xb = blk[0]
            nb = _sq_norms(xb, st)
            for j0, j1 in tile_ranges(xb.shape[0], tile):
                for i0, i1 in tile_ranges(x.shape[0], tile):
                    P = _kernel(x[i0:i1], xb[j0:j1], n_loc[i0:i1], nb[j0:j1], t, st).sub_(lse).exp_()
                    if q == ring.rank:
                        P.diagonal(i0 - j0).zero_()
                    rho[i0:i1] += P.sum(1)
                    acc_mm(px[i0:i1], P, xb[j0:j1], 1.0)

        ring_loop(ring, [x], [], step)
        grad = (rho[:, None] * x.to(st)).sub_(px).mul_(-4.0 * t * g_sum)
        return grad.to(x.dtype), None, None, None


def uniformity_loss(
    features: torch.Tensor, *, t: float = 2.0, tile_size: int = 1024, group=None, exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Uniformity over all pairs of the global batch (every rank's rows):

        U = log( 1/(N(N-1)) sum_{i != j} exp(-t ||x_i - x_j||^2) ),

    with ``||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j`` (features need not be unit
    norm).  Tiled (no N x N matrix) and ring-distributed.  Every rank returns the full ``U``
    (so the mean over ranks is ``U``); its backward gives each rank's rows
    ``(sum_r g_r) dU/dx``, i.e. ``W x`` the single-process gradient when every rank
    back-propagates its loss with weight 1.  Needs a global batch of at least 2.
    ``exchange`` / ``exchange_memory_mb`` as in ``softmax_contrastive_loss`` (only the
    features travel; no accumulator).
    Returns ``(loss, {"loss"})``; ``loss`` is float32 for half-precision inputs.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be (n, D) with n >= 1, got {tuple(features.shape)}")
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    ring = make_ring(features.shape[0], features.device, group, exchange=exchange,
                     row_bytes=pass_row_bytes([(features.shape[1], features.dtype)]), memory_mb=exchange_memory_mb)
    if ring.total < 2:
        raise ValueError("uniformity needs a global batch of at least 2 rows")
    loss = _TiledUniformity.apply(features, float(t), int(tile_size), ring)
    return loss, {"loss": loss.detach()}


def uniformity_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    t: float = 2.0,
    tile_size: int = 1024,
    group=None,
    union_weight: float = 0.0,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Within-modality uniformity plus the union of both modalities:

        loss = (U(a) + U(b)) / 2 + union_weight * U([a; b]),

    ``U([a; b])`` over the 2N rows of both modalities (global, all ranks).  The union is
    always reported as a metric; with ``union_weight = 0`` (default) it is computed
    forward-only (no graph, no backward pass) and does not enter the loss.  Distributed
    convention as ``uniformity_loss``.
    Returns ``(loss, {"loss", "uniformity_image", "uniformity_text", "uniformity_union"})``.
    """
    kw = dict(t=t, tile_size=tile_size, group=group, exchange=exchange, exchange_memory_mb=exchange_memory_mb)
    u_img, _ = uniformity_loss(image_features, **kw)
    u_txt, _ = uniformity_loss(text_features, **kw)
    both = torch.cat([image_features, text_features])
    with torch.set_grad_enabled(torch.is_grad_enabled() and union_weight != 0):
        u_union, _ = uniformity_loss(both, **kw)
    loss = (u_img + u_txt) / 2
    if union_weight != 0:
        loss = loss + union_weight * u_union
    metrics = {
        "loss": loss.detach(),
        "uniformity_image": u_img.detach(),
        "uniformity_text": u_txt.detach(),
        "uniformity_union": u_union.detach(),
    }
    return loss, metrics


def alignment_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, *, alpha: float = 2.0, group=None
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Alignment of positive pairs, ``A = 1/B sum_i ||a_i - b_i||^alpha`` (global ``B``).

    Pairs are local to a rank, so no ring: rank ``r`` returns
    ``W/B sum_{i in r} ||a_i - b_i||^alpha`` (mean over ranks = ``A``, row gradients
    ``W x`` the single-process ones; per-rank sizes may differ).  Computed in float32 for
    half-precision inputs.  ``alpha = 2`` uses the squared norm (smooth at ``a_i = b_i``);
    other ``alpha > 0`` use ``||.||^alpha`` with the zero subgradient at ``a_i = b_i``.
    Returns ``(loss, {"loss"})``.
    """
    a, b = image_features, text_features
    if a.dim() != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"features must both be (n, D), n >= 1, got {tuple(a.shape)} and {tuple(b.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    ring = make_ring(a.shape[0], a.device, group)
    st = stat_dtype(a.dtype)
    d = a.to(st) - b.to(st)
    per_row = (d * d).sum(1) if alpha == 2 else torch.linalg.vector_norm(d, dim=1).pow(alpha)
    loss = per_row.sum() * (ring.world / ring.total)
    return loss, {"loss": loss.detach()}
