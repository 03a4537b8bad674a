"""Tiled, ring-distributed weighted contrastive losses: DCL and DiHT's HN-NCE.

Notation as in ``tiled_softmax``: global batch ``B`` (the ranks' rows in rank order),
``S_ij = s a_i.b_j``.  HN-NCE (Radenovic et al., arXiv 2301.02280), image->text row ``i``
with hardness ``beta = beta_image``, for ``j != i``:

    w_ij = exp(beta S_ij) / mean_{k != i} exp(beta S_ik),
    L_i  = -S_ii + log( alpha e^{S_ii} + sum_{j != i} w_ij e^{S_ij} );

text->image columns the same with ``beta_text``; ``L = 1/2 [mean_i L_i + mean_j L_j]``.
``alpha = 0, beta = 0`` is DCL (the positive leaves the denominator); ``alpha = 1, beta = 0``
is InfoNCE.

Two statistics per row (and per column), over the off-diagonal entries only:
``U_i = lse_{j != i} (1 + beta) S_ij`` and ``V_i = lse_{j != i} beta S_ij``, so that

    sum_{j != i} w_ij e^{S_ij} = e^{N_i},  N_i = log(B - 1) + U_i - V_i   (N_i = U_i if beta = 0),
    L_i = logaddexp(log alpha, N_i - S_ii).

The diagonal is masked to ``-inf`` inside the tiles that hold it (never subtracted in the
log domain, which would cancel catastrophically when the positive dominates).

Weight-gradient convention: the weights are functions of ``S`` and gradients flow through
them (the formula above is differentiated as written).  DiHT's official repository
(facebookresearch/diht) publishes models and inference only, no loss; the paper defines
``w`` as a function of the similarities with no stop-gradient, and the HN-NCE code that
circulates with it (``HardNegativeNCE``) does not detach either.  With
``nu_i = sigmoid(N_i - S_ii - log alpha)`` (the negatives' share of the denominator):

    dL_i/dS_ii = -nu_i,
    dL_i/dS_ij = nu_i [ (1 + beta) exp((1 + beta) S_ij - U_i) - beta exp(beta S_ij - V_i) ]  (j != i).

Distributed: rank ``r`` returns ``L_r = W/(2B) [sum_{i in r} L_i + sum_{j in r} L_j]``
(mean over ranks = full loss; feature gradients ``W x`` single-process; the scale gradient
is this rank's rows' share, summing to the total), exactly as ``tiled_softmax``.  Row
statistics stay home; column statistics travel with their block around the ring.
Memory ``O(T^2 + b D)``; statistics in float32 for half-precision inputs.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .ring import DEFAULT_EXCHANGE_MEMORY_MB, Ring, make_ring, ring_loop
from .tiled_softmax import (
    acc_mm, check_inputs, exchange_row_bytes, logit_sums, metrics_from_sums, rowwise_dot, scalar_on_device,
    scaled_logits, stat_dtype, tile_ranges,
)

NEG_INF = float("-inf")


def _merge_lse(stat, S, coef: float, dim: int, off):
    """``stat <- logaddexp(stat, lse_dim(coef S))`` with the global diagonal (tile offset
    ``off``, ``None`` if the tile cannot hold it) excluded."""
    X = S * coef
    if off is not None:
        X.diagonal(off).fill_(NEG_INF)
    torch.logaddexp(stat, X.logsumexp(dim), out=stat)


def _stat_tiles(a, b, s, betas, row_stats, col_stats, own: bool, tile: int):
    """Merge ``U`` (and ``V`` when beta != 0) of rows (``a``) and columns (``b``)."""
    st = row_stats[0].dtype
    for j0, j1 in tile_ranges(b.shape[0], tile):
        bj = b[j0:j1]
        for i0, i1 in tile_ranges(a.shape[0], tile):
            S = scaled_logits(a[i0:i1], bj, s, st)
            off = i0 - j0 if own else None
            for dim, beta, stats, sl in ((1, betas[0], row_stats, slice(i0, i1)),
                                         (0, betas[1], col_stats, slice(j0, j1))):
                _merge_lse(stats[0][sl], S, 1.0 + beta, dim, off)
                if beta != 0:
                    _merge_lse(stats[1][sl], S, beta, dim, off)


def _direction_terms(stats, diag, beta: float, log_alpha: float, n_neg: int):
    """Per-row loss ``L_i = logaddexp(log alpha, N_i - S_ii)`` and ``nu_i``."""
    if n_neg == 0:
        neg = torch.full_like(diag, NEG_INF)
    elif beta == 0:
        neg = stats[0]
    else:
        neg = stats[0] - stats[1] + math.log(n_neg)
    x = neg - diag
    la = torch.full_like(x, log_alpha)
    return torch.logaddexp(la, x), torch.sigmoid(x - la)


def _dir_grad(S, coef, U, V, beta: float):
    """``coef [(1+beta) exp((1+beta) S - U) - beta exp(beta S - V)]``; ``coef``, ``U``,
    ``V`` already shaped to broadcast along the reduced dimension."""
    G = torch.mul(S, 1.0 + beta).sub_(U).exp_().mul_(coef * (1.0 + beta))
    if beta != 0:
        G.sub_(torch.mul(S, beta).sub_(V).exp_().mul_(coef * beta))
    return G


def _grad_tiles(a, b, s, betas, row, col, ga_u, gb_u, own: bool, tile: int):
    """``ga_u += G b``, ``gb_u += G^T a`` over the off-diagonal tile entries.  ``row`` and
    ``col`` are ``(coef, U, V)`` of local rows / the visiting column block."""
    st = ga_u.dtype
    for j0, j1 in tile_ranges(b.shape[0], tile):
        bj = b[j0:j1]
        ccoef, cU, cV = (None if x is None else x[None, j0:j1] for x in col)
        for i0, i1 in tile_ranges(a.shape[0], tile):
            ai = a[i0:i1]
            rcoef, rU, rV = (None if x is None else x[i0:i1, None] for x in row)
            S = scaled_logits(ai, bj, s, st)
            G = _dir_grad(S, rcoef, rU, rV, betas[0]).add_(_dir_grad(S, ccoef, cU, cV, betas[1]))
            if own:
                G.diagonal(i0 - j0).zero_()
            acc_mm(ga_u[i0:i1], G, bj, 1.0)
            acc_mm(gb_u[j0:j1], G.T, ai, 1.0)


class _TiledWeightedContrastive(torch.autograd.Function):
    """HN-NCE (DCL as ``alpha = beta = 0``); returns ``(loss_r, metric sums)``."""

    @staticmethod
    def forward(ctx, a, b, scale, betas, alpha: float, tile: int, ring: Ring):
        st = stat_dtype(a.dtype)
        s, n = scalar_on_device(scale, st), a.shape[0]
        new = lambda: torch.full((n,), NEG_INF, dtype=st, device=a.device)  # noqa: E731
        row_stats = [new() for _ in range(1 + (betas[0] != 0))]
        col_stats = [new() for _ in range(1 + (betas[1] != 0))]
        b_sum = torch.zeros(a.shape[1], dtype=st, device=a.device)

        def step(q, blk, acc_q):
            _stat_tiles(a, blk[0], s, betas, row_stats, acc_q, q == ring.rank, tile)
            b_sum.add_(blk[0].sum(0, dtype=st))

        col_stats = ring_loop(ring, [b], col_stats, step, merge=["logaddexp"] * len(col_stats))
        diag = s * rowwise_dot(a, b, st)
        log_alpha = math.log(alpha) if alpha > 0 else NEG_INF
        n_neg = ring.total - 1
        row_l, row_nu = _direction_terms(row_stats, diag, betas[0], log_alpha, n_neg)
        col_l, col_nu = _direction_terms(col_stats, diag, betas[1], log_alpha, n_neg)
        loss = (row_l.sum() + col_l.sum()) * (ring.world / (2.0 * ring.total))
        pad = lambda x: x if len(x) == 2 else x + [torch.empty(0, dtype=st, device=a.device)]  # noqa: E731
        ctx.save_for_backward(a, b, scale, row_nu, col_nu, *pad(row_stats), *pad(col_stats))
        ctx.betas, ctx.tile, ctx.ring = betas, tile, ring
        sums = logit_sums(a, b_sum, diag, s, ring.total)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, g, _unused):
        a, b, scale, row_nu, col_nu, rU, rV, cU, cV = ctx.saved_tensors
        ring, betas, st = ctx.ring, ctx.betas, row_nu.dtype
        s = scalar_on_device(scale, st)
        c = ring.gather_scalar(g.to(st)) * (ring.world / (2.0 * ring.total))  # device scalars, no host read
        rV = rV if betas[0] != 0 else None
        ga_u = torch.zeros(a.shape, dtype=st, device=a.device)
        gb_u = torch.zeros(b.shape, dtype=st, device=a.device)
        row = (row_nu * c[ring.rank], rU, rV)
        static = [b, col_nu, cU] + ([cV] if betas[1] != 0 else [])

        def step(q, blk, acc_q):
            col = (blk[1] * c[q], blk[2], blk[3] if betas[1] != 0 else None)
            _grad_tiles(a, blk[0], s, betas, row, col, ga_u, acc_q[0], q == ring.rank, ctx.tile)

        (gb_u,) = ring_loop(ring, static, [gb_u], step, merge=["sum"])
        # Diagonal: dL_r/dS_ii = -c_r (nu_i + nu'_i) (both directions own the positive).
        d = ((row_nu + col_nu) * -c[ring.rank])[:, None]
        ga_u.add_(d * b.to(st))
        gb_u.add_(d * a.to(st))
        gs = torch.vdot(a.to(st).flatten(), ga_u.flatten())
        ga, gb = ga_u.mul_(s), gb_u.mul_(s)
        return (ga.to(a.dtype), gb.to(b.dtype), gs.to(scale.dtype).reshape(scale.shape),
                None, None, None, None)


def _weighted(a, b, scale, betas, alpha, tile_size, group, name, exchange, memory_mb):
    check_inputs(a, b, tile_size, scale)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    betas = (float(betas[0]), float(betas[1]))
    # Column statistics: U (and V when beta_text != 0); the backward gathers nu, U[, V].
    n_col = 1 + (betas[1] != 0)
    ring = make_ring(a.shape[0], a.device, group, exchange=exchange,
                     row_bytes=exchange_row_bytes(a, n_col, 1 + n_col), memory_mb=memory_mb)
    if alpha == 0 and ring.total < 2:
        raise ValueError(f"{name} needs a global batch of at least 2 (no negatives otherwise)")
    loss, sums = _TiledWeightedContrastive.apply(a, b, scale, betas, float(alpha), int(tile_size), ring)
    return loss, metrics_from_sums(loss, sums)


def decoupled_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    tile_size: int = 1024,
    group=None,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Decoupled contrastive loss (DCL, Yeh et al.): the positive leaves the denominator,

        L = 1/2 [ 1/B sum_i (-S_ii + log sum_{j != i} exp S_ij)
                + 1/B sum_j (-S_jj + log sum_{i != j} exp S_ij) ],

    tiled and distributed like ``softmax_contrastive_loss`` (same per-rank share, gradient
    convention and ``exchange`` / ``exchange_memory_mb``).  Needs a global batch of at least 2.
    Returns ``(loss, {"loss", "pos_logit_mean", "neg_logit_mean"})`` (detached tensors).
    """
    return _weighted(image_features, text_features, logit_scale, (0.0, 0.0), 0.0, tile_size, group, "DCL",
                     exchange, exchange_memory_mb)


def hard_negative_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    beta_image: float = 0.5,
    beta_text: float = 0.5,
    alpha: float = 1.0,
    tile_size: int = 1024,
    group=None,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DiHT's HN-NCE: for row ``i`` (image->text, ``beta = beta_image``),

        w_ij = exp(beta S_ij) / mean_{k != i} exp(beta S_ik)             (j != i),
        L_i  = -S_ii + log( alpha e^{S_ii} + sum_{j != i} w_ij e^{S_ij} ),

    columns (text->image) the same with ``beta_text``; ``L = 1/2 [mean_i L_i + mean_j L_j]``.
    Gradients flow through the weights (no stop-gradient; see the module docstring).
    ``beta = 0, alpha = 1`` is InfoNCE, ``beta = 0, alpha = 0`` is DCL.  A global batch of
    1 (no negatives) gives ``log alpha`` per row and is rejected when ``alpha = 0``.
    Tiled (two log-domain statistics per row and column, float32 for half inputs) and
    distributed with the convention (and ``exchange`` / ``exchange_memory_mb``) of
    ``softmax_contrastive_loss``.
    Returns ``(loss, {"loss", "pos_logit_mean", "neg_logit_mean"})`` (detached tensors).
    """
    return _weighted(image_features, text_features, logit_scale, (beta_image, beta_text), alpha,
                     tile_size, group, "HN-NCE with alpha=0", exchange, exchange_memory_mb)
