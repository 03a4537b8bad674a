"""Intra-modal contrast: tiled, ring-distributed NT-Xent (SimCLR) and MERL's embedding dropout.

Two views ``x_i``, ``x'_i`` of each of the ``N`` items of the global batch (image
augmentations, word dropout / a second caption, dropout on an ECG embedding).  The rows are
L2-normalised *inside* the loss, as SimCLR does, so the callers may pass raw projections:
``z = normalize([x; x'])`` (``2N`` rows), ``S_ik = z_i.z_k / tau`` and

    L = -1/(2N) sum_i log( exp(S_{i,p(i)}) / sum_{k != i} exp(S_ik) )
      =  1/(2N) sum_i (lse_i - S_{i,p(i)}),   lse_i = log sum_{k != i} exp(S_ik),

with ``p(i)`` the other view of ``i``'s item.  Only the self-similarity leaves the
denominator; the positive stays in it.  With ``N = 1`` the denominator is the positive
alone and the loss is 0.

Distribution (same convention as ``tiled_softmax``): rank ``r`` holds the views of its
``n_r`` items and stacks them into its block ``u_r = [z^(r); z'^(r)]`` (``2 n_r`` rows);
the global row order does not matter because ``L`` is a sum over rows.  Rank r returns
``L_r = W/(2N) sum_{i in r} (lse_i - S_{i,p(i)})`` so that ``mean_r L_r = L``; its
gradient for its own rows is ``W x`` the single-process one (open_clip ``local_loss +
gather_with_grad``); per-rank sizes may differ.

Symmetry is exploited: ``S`` is symmetric, so the column statistics are the row
statistics.  Forward: one ring pass of the blocks ``u_q``; each rank merges
``lse_i <- logaddexp(lse_i, lse_tile)`` over ``T x T`` tiles (self-similarity set to
``-inf``), keeping only its own rows' ``lse`` (float32 for half inputs).  Backward:
with ``c_r = g_r W / (2N)`` and ``P_ik = exp(S_ik - lse_i)``,

    dL/dS_ik = c_{r(i)} P_ik - c_{r(i)} [k = p(i)]                   (k != i)
    dL/du_i  = 1/tau [ sum_{k != i} (c_{r(i)} P_ik + c_{r(k)} P_ki) u_k - 2 c_{r(i)} u_{p(i)} ]

and ``P_ki = exp(S_ik - lse_k)`` needs only the other block's ``lse``.  So the backward is
one more ring pass of ``(u_q, lse_q)`` with *no* travelling gradient accumulator: every
rank computes the complete gradient of its own rows.  Tiles are recomputed; peak extra
memory is ``O(T^2 + n_r D)`` (nothing of size ``2N x 2N`` or ``n_r x N``).  The
L2-normalisation (and its chain rule) is plain autograd outside the tiled kernel, which
itself is exact for any ``u``.  ``temperature`` is a fixed hyper-parameter (no gradient).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .ring import DEFAULT_EXCHANGE_MEMORY_MB, Ring, make_ring, pass_row_bytes, ring_loop
from .tiled_softmax import acc_mm, rowwise_dot, scaled_logits, stat_dtype, tile_ranges


def _tile_logits(ui, uk, inv_tau, st, diag_offset: Optional[int]):
    """``S = ui uk^T / tau`` in ``st``; entries with global row == column set to -inf.
    ``diag_offset = k0 - i0`` when both tiles come from the same block, else ``None``."""
    S = scaled_logits(ui, uk, inv_tau, st)
    if diag_offset is not None:
        lo, hi = max(0, diag_offset), min(S.shape[0], S.shape[1] + diag_offset)
        if lo < hi:
            idx = torch.arange(lo, hi, device=S.device)
            S[idx, idx - diag_offset] = float("-inf")
    return S


def _tiles(n_rows: int, n_cols: int, tile: int, same_block: bool):
    """``(i0, i1, k0, k1, diag_offset)`` for every tile of an ``n_rows x n_cols`` block."""
    for k0, k1 in tile_ranges(n_cols, tile):
        for i0, i1 in tile_ranges(n_rows, tile):
            yield i0, i1, k0, k1, (k0 - i0) if same_block else None


class _TiledNTXent(torch.autograd.Function):
    """``(loss_r, metric sums)`` of the NT-Xent over ``u`` (this rank's ``2 n_r`` rows,
    first half view 1, second half view 2); see the module docstring."""

    @staticmethod
    def forward(ctx, u, inv_tau: float, tile: int, ring: Ring):
        st = stat_dtype(u.dtype)
        lse = torch.full((u.shape[0],), float("-inf"), dtype=st, device=u.device)
        u_sum = torch.zeros(u.shape[1], dtype=st, device=u.device)

        def step(q, blk, _acc):
            uk = blk[0]
            for i0, i1, k0, k1, off in _tiles(u.shape[0], uk.shape[0], tile, q == ring.rank):
                S = _tile_logits(u[i0:i1], uk[k0:k1], inv_tau, st, off)
                torch.logaddexp(lse[i0:i1], S.logsumexp(1), out=lse[i0:i1])
            u_sum.add_(uk.sum(0, dtype=st))

        ring_loop(ring, [u], [], step)
        n = u.shape[0] // 2
        pos = rowwise_dot(u[:n], u[n:], st).mul_(inv_tau).repeat(2)
        loss = (lse - pos).sum() * (ring.world / float(ring.total))
        ctx.save_for_backward(u, lse)
        ctx.inv_tau, ctx.tile, ctx.ring = inv_tau, tile, ring
        # Metric sums (cosine similarities, no matrix): sum_{i in r, k != i} u_i.u_k.
        sq = rowwise_dot(u, u, st).sum()
        neg = u.sum(0, dtype=st) @ u_sum - sq - pos.sum() / inv_tau
        sums = torch.stack([pos.sum() / inv_tau, neg, pos.new_tensor(2 * n),
                            pos.new_tensor(2 * n * max(ring.total - 2, 0))])
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, g, _unused):
        u, lse = ctx.saved_tensors
        ring, inv_tau, st = ctx.ring, ctx.inv_tau, lse.dtype
        c = ring.gather_scalar(g.to(st)) * (ring.world / float(ring.total))  # device scalars, no host read
        c_r = c[ring.rank]
        gu = torch.zeros(u.shape, dtype=st, device=u.device)

        def step(q, blk, _acc):
            uk, lse_k = blk
            for i0, i1, k0, k1, off in _tiles(u.shape[0], uk.shape[0], ctx.tile, q == ring.rank):
                S = _tile_logits(u[i0:i1], uk[k0:k1], inv_tau, st, off)
                G = torch.sub(S, lse[i0:i1, None]).exp_().mul_(c_r)
                G.add_(S.sub_(lse_k[None, k0:k1]).exp_().mul_(c[q]))
                acc_mm(gu[i0:i1], G, uk[k0:k1], 1.0)

        ring_loop(ring, [u, lse], [], step)
        # Positive pair: S_{i,p(i)} appears in row i's and row p(i)'s term.
        n = u.shape[0] // 2
        gu[:n].add_(u[n:].to(st) * (-2.0 * c_r))
        gu[n:].add_(u[:n].to(st) * (-2.0 * c_r))
        return gu.mul_(inv_tau).to(u.dtype), None, None, None


def _check(view1: torch.Tensor, view2: torch.Tensor, temperature: float, tile_size: int) -> None:
    if view1.dim() != 2 or view1.shape != view2.shape:
        raise ValueError(f"views must both be (n, D), got {tuple(view1.shape)} and {tuple(view2.shape)}")
    if view1.shape[0] == 0:
        raise ValueError("views must have at least one row per rank")
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def nt_xent_loss(
    view1: torch.Tensor,
    view2: torch.Tensor,
    *,
    temperature: float = 0.1,
    tile_size: int = 1024,
    group=None,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """SimCLR's NT-Xent between two views, tiled and (if distributed) exchanged.

    ``L = -1/(2N) sum_i log( exp(z_i.z_p(i)/tau) / sum_{k != i} exp(z_i.z_k/tau) )`` over the
    ``2N`` global views ``z`` (rows L2-normalised here; ``p(i)`` = the other view of ``i``).
    ``view1[j]`` and ``view2[j]`` are the two views of local item ``j``.  Each rank passes
    its local rows; the mean over ranks of the returned loss is the full-batch loss and each
    rank's gradient is ``world_size x`` the single-process gradient of its rows.  Per-rank
    sizes may differ.  Half-precision inputs keep float32 statistics; the loss is float32.
    ``exchange`` / ``exchange_memory_mb`` as in ``softmax_contrastive_loss`` (the blocks are
    the ``2 n_r`` stacked views; no accumulator travels).
    Returns ``(loss, {"loss", "pos_sim_mean", "neg_sim_mean"})`` (detached; cosine
    similarities averaged over this rank's rows; ``neg_sim_mean`` is 0 without negatives).
    """
    _check(view1, view2, temperature, tile_size)
    u = F.normalize(torch.cat([view1, view2]), dim=1)
    st = stat_dtype(u.dtype)  # the backward gathers the views and their row statistics
    row_bytes = pass_row_bytes([(u.shape[1], u.dtype), (1, st)])
    ring = make_ring(u.shape[0], u.device, group, exchange=exchange, row_bytes=row_bytes,
                     memory_mb=exchange_memory_mb)
    loss, sums = _TiledNTXent.apply(u, 1.0 / float(temperature), int(tile_size), ring)
    pos, neg, n_pos, n_neg = sums.detach().unbind()
    return loss, {"loss": loss.detach(), "pos_sim_mean": pos / n_pos, "neg_sim_mean": neg / n_neg.clamp(min=1)}


def embedding_dropout_views(
    features: torch.Tensor, p: float = 0.1, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two independent dropout draws of the same embeddings (MERL's ECG views).

    Training-mode ``torch.nn.functional.dropout`` (zero with probability ``p``, scale the
    rest by ``1/(1-p)``) applied twice; with a ``generator`` the same masks are drawn from
    it instead (reproducible).  Gradients flow to ``features`` through both views.
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if generator is None:
        return F.dropout(features, p, training=True), F.dropout(features, p, training=True)

    def draw():
        keep = torch.rand(features.shape, generator=generator, device=features.device) >= p
        return features * keep.to(features.dtype) / (1.0 - p)

    return draw(), draw()


def embed_dropout_loss(
    features: torch.Tensor,
    *,
    p: float = 0.1,
    temperature: float = 0.1,
    tile_size: int = 1024,
    group=None,
    generator: Optional[torch.Generator] = None,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """NT-Xent between two embedding-dropout views of ``features`` (MERL):
    ``L = nt_xent(dropout_p(x), dropout_p'(x))``; see :func:`nt_xent_loss`."""
    v1, v2 = embedding_dropout_views(features, p, generator)
    return nt_xent_loss(v1, v2, temperature=temperature, tile_size=tile_size, group=group, exchange=exchange,
                        exchange_memory_mb=exchange_memory_mb)
