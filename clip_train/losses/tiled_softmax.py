"""Tiled, ring-distributed symmetric InfoNCE (CLIP) loss that never builds the B x B logits.

Notation: global batch ``B`` (concatenation of the ranks' local rows, in rank order),
``a_i`` image and ``b_j`` text features, ``s`` the logit scale (a multiplier),
``S_ij = s a_i.b_j``.  The full-batch loss is

    L = 1/2 [ 1/B sum_i (lse_j S_ij - S_ii) + 1/B sum_j (lse_i S_ij - S_jj) ].

Rank ``r`` returns ``L_r = W/(2B) [sum_{i in r} (lse_row_i - S_ii) + sum_{j in r}
(lse_col_j - S_jj)]`` so that ``mean_r L_r = L`` (open_clip ``ClipLoss(local_loss=True,
gather_with_grad=True)``, which divides by the local size ``b = B/W``).

Forward: one pass over ``T x T`` tiles keeps two float32 (or float64) statistics,
``lse_row`` (local rows) and ``lse_col`` (column block, travelling with the block around
the ring), merged with ``lse <- logaddexp(lse, lse_tile)``.

Backward (tiles recomputed): with ``c_r = g_r W / (2B)`` (``g_r`` the incoming gradient
of rank r's loss),

    dL/dS_ij = c_p P^row_ij + c_q P^col_ij - 2 c_p delta_ij   (i on rank p, j on rank q),
    P^row_ij = exp(S_ij - lse_row_i),  P^col_ij = exp(S_ij - lse_col_j),
    dL/da_i = s sum_j G_ij b_j,  dL/db_j = s sum_i G_ij a_i,  dL/ds = sum_ij G_ij a_i.b_j.

``dL/db`` for a column block is accumulated on the ring and arrives home after W steps.
``dL/ds = sum_i a_i.(G b)_i`` comes for free from the image-gradient accumulator; rank r
returns its rows' share, so the sum over ranks is the full ``d(sum_r g_r L_r)/ds`` and
(with g_r = 1) the mean over ranks equals the single-process gradient, as with open_clip
(whose per-rank value is ``dL_r/ds`` instead: same mean, different split).  The diagonal
term is added analytically.
Peak extra memory: a few ``T x T`` tiles plus ``O(b D)`` accumulators and one block in
flight, i.e. ``O(T^2 + b D)``; nothing of size ``B x B`` or ``b x B``.

The blocks move between ranks with ``ring.ring_loop``: around the ring described above
(``exchange="ring"``), or with one all-gather of the features and one all-to-all that sends
the column accumulators home (``exchange="allgather"``, ``O(B D)`` memory, two collectives
per pass instead of ``W`` hops); ``"auto"`` picks the all-gather when it fits a memory
budget.  The maths, and so the gradient convention above, is the same for both; every
tiled term (sigmoid, DCL / HN-NCE, NT-Xent, uniformity) shares this mechanism.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch

from .backend import default_tile_size, resolve_backend
from .ring import DEFAULT_EXCHANGE_MEMORY_MB, Ring, make_ring, pass_row_bytes, ring_loop


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics / accumulators dtype: float32 for half types, else the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def tile_ranges(n: int, tile: int):
    """``[(start, stop), ...]`` covering ``range(n)`` in chunks of ``tile``."""
    return [(i, min(i + tile, n)) for i in range(0, n, tile)]


def check_inputs(a: torch.Tensor, b: torch.Tensor, tile_size: int, *scalars) -> None:
    """Validate shapes shared by both losses (clear message instead of a deep error)."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"features must both be (n, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("features must have at least one row per rank")
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    for x in scalars:
        if x.numel() != 1:
            raise ValueError(f"logit_scale/logit_bias must be scalars, got shape {tuple(x.shape)}")


def rowwise_dot(a, b, dtype):
    """``(a_i . b_i)_i`` accumulated in ``dtype``."""
    return (a.to(dtype) * b.to(dtype)).sum(1)


def scalar_on_device(x: torch.Tensor, dtype) -> torch.Tensor:
    """A learnable scalar (scale, bias) as a 0-dim tensor for the tile maths: used as a tensor,
    never read on the host (``float(x)`` would synchronise a GPU at every use)."""
    return x.detach().to(dtype).reshape(())


def scaled_logits(ai, bj, s, dtype, bias=None):
    """``S = s ai bj^T (+ bias)`` in ``dtype``; ``s`` and ``bias`` are 0-dim tensors or numbers."""
    S = (ai @ bj.T).to(dtype).mul_(s)
    return S if bias is None else S.add_(bias)


def acc_mm(out, m1, m2, alpha):
    """``out += alpha m1 m2`` (``m1`` cast to the features' dtype; ``out`` stays float32)."""
    m1 = m1.to(m2.dtype)
    if isinstance(alpha, torch.Tensor):  # a device scalar: no host read
        out.add_((m1 @ m2).to(out.dtype).mul_(alpha))
    elif out.dtype == m2.dtype:
        out.addmm_(m1, m2, alpha=alpha)
    else:
        out.add_(m1 @ m2, alpha=alpha)


def logit_sums(a, b_sum, diag, s, n_cols):
    """Metrics without the matrix: ``sum_{i,j} a_i.b_j = (sum_i a_i).(sum_j b_j)``.
    Returns ``[sum of positive logits, sum of negative logits, n_pos, n_neg]``."""
    st = b_sum.dtype
    total = s * (a.sum(0, dtype=st) @ b_sum)
    n = a.shape[0]
    return torch.stack([diag.sum(), total - diag.sum(), diag.new_tensor(n), diag.new_tensor(n * (n_cols - 1))])


def _lse_tiles(a, b, s, row_lse, col_lse, tile):
    """Merge the row/column log-sum-exp of ``S = s a b^T`` into the running statistics."""
    st = row_lse.dtype
    for j0, j1 in tile_ranges(b.shape[0], tile):
        bj = b[j0:j1]
        for i0, i1 in tile_ranges(a.shape[0], tile):
            S = scaled_logits(a[i0:i1], bj, s, st)
            torch.logaddexp(row_lse[i0:i1], S.logsumexp(1), out=row_lse[i0:i1])
            torch.logaddexp(col_lse[j0:j1], S.logsumexp(0), out=col_lse[j0:j1])


def _grad_tiles(a, b, s, row_lse, col_lse, c_row, c_col, ga_u, gb_u, tile):
    """Tile part of the gradient, ``G = c_row P^row + c_col P^col``, without the factor s:
    ``ga_u += G b`` (local rows), ``gb_u += G^T a`` (travelling column block).
    The diagonal term and the factor ``s`` are applied by the caller."""
    st = ga_u.dtype
    for j0, j1 in tile_ranges(b.shape[0], tile):
        bj = b[j0:j1]
        for i0, i1 in tile_ranges(a.shape[0], tile):
            ai = a[i0:i1]
            S = scaled_logits(ai, bj, s, st)
            G = torch.sub(S, row_lse[i0:i1, None]).exp_().mul_(c_row)
            G.add_(S.sub_(col_lse[None, j0:j1]).exp_().mul_(c_col))
            acc_mm(ga_u[i0:i1], G, bj, 1.0)
            acc_mm(gb_u[j0:j1], G.T, ai, 1.0)


class _TiledSoftmax(torch.autograd.Function):
    """Returns ``(loss_r, metric sums)``; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, a, b, scale, tiles, ring: Ring):
        # tiles = (lse_tiles, grad_tiles): the torch loops below or triton_tiles' kernels.
        st = stat_dtype(a.dtype)
        s = scalar_on_device(scale, st)
        row_lse = torch.full((a.shape[0],), float("-inf"), dtype=st, device=a.device)
        col_lse = torch.full_like(row_lse, float("-inf"))
        b_sum = torch.zeros(a.shape[1], dtype=st, device=a.device)

        def step(q, blk, acc_q):
            tiles[0](a, blk[0], s, row_lse, acc_q[0])
            b_sum.add_(blk[0].sum(0, dtype=st))

        (col_lse,) = ring_loop(ring, [b], [col_lse], step, merge=["logaddexp"])
        diag = s * rowwise_dot(a, b, st)
        loss = (row_lse - diag).sum() + (col_lse - diag).sum()
        loss = loss * (ring.world / (2.0 * ring.total))
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.tiles, ctx.ring = tiles, ring
        sums = logit_sums(a, b_sum, diag, s, ring.total)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, g, _unused):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        ring, st = ctx.ring, row_lse.dtype
        s = scalar_on_device(scale, st)
        # c_q = g_q W / (2B): every rank's incoming gradient weights its own rows/columns.
        # Kept as device tensors: reading them on the host would stall a GPU twice per step.
        c = ring.gather_scalar(g.to(st)) * (ring.world / (2.0 * ring.total))
        ga_u = torch.zeros(a.shape, dtype=st, device=a.device)
        gb_u = torch.zeros(b.shape, dtype=st, device=a.device)

        def step(q, blk, acc_q):
            ctx.tiles[1](a, blk[0], s, row_lse, blk[1], c[ring.rank], c[q], ga_u, acc_q[0])

        (gb_u,) = ring_loop(ring, [b, col_lse], [gb_u], step, merge=["sum"])
        # Diagonal: dL_r/dS_ii = -2 c_r (the positive appears in both directions).
        ga_u.add_(b.to(st) * (-2.0 * c[ring.rank]))
        gb_u.add_(a.to(st) * (-2.0 * c[ring.rank]))
        # dL/ds = sum_ij G_ij a_i.b_j = sum_i a_i.(G b)_i: this rank's rows' share; the sum
        # over ranks is the total (so the mean over ranks matches open_clip's mean).
        gs = torch.vdot(a.to(st).flatten(), ga_u.flatten())
        ga, gb = ga_u.mul_(s), gb_u.mul_(s)
        return ga.to(a.dtype), gb.to(b.dtype), gs.to(scale.dtype).reshape(scale.shape), None, None


def resolve_tiles(backend: str, tile_size: Optional[int], a: torch.Tensor) -> tuple[str, int]:
    """``(backend, tile)`` resolved for features ``a``: see ``backend.py`` (the tile edge only
    matters to the torch backend; ``None`` picks :func:`backend.default_tile_size`)."""
    tile = default_tile_size(a.device, a.shape[-1], a.dtype) if tile_size is None else tile_size
    return resolve_backend(backend, a), tile


def _softmax_tiles(backend: str, tile: int):
    if backend == "triton":
        from . import triton_tiles  # imported on first use: see backend.py

        return triton_tiles.softmax_lse_tiles, triton_tiles.softmax_grad_tiles
    return partial(_lse_tiles, tile=tile), partial(_grad_tiles, tile=tile)


def exchange_row_bytes(a: torch.Tensor, n_col_stats: int = 1, n_back_stats: int = 1) -> int:
    """Per-row bytes of the allgather exchange for the two-tower terms (softmax, sigmoid,
    DCL / HN-NCE): the larger of the forward (features gathered, ``n_col_stats`` column
    statistics sent home) and the backward (features + ``n_back_stats`` saved column
    statistics gathered, feature gradients sent home)."""
    d, st = a.shape[1], stat_dtype(a.dtype)
    fwd = pass_row_bytes([(d, a.dtype)], [(n_col_stats, st)] if n_col_stats else [])
    bwd = pass_row_bytes([(d, a.dtype)] + [(1, st)] * n_back_stats, [(d, st)])
    return max(fwd, bwd)


def metrics_from_sums(loss: torch.Tensor, sums: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``loss`` and mean positive / negative logit over this rank's rows (detached).
    ``neg_logit_mean`` is 0 when there are no negatives (global batch of 1)."""
    pos, neg, n_pos, n_neg = sums.detach().unbind()
    return {
        "loss": loss.detach(),
        "pos_logit_mean": pos / n_pos,
        "neg_logit_mean": neg / n_neg.clamp(min=1),
    }


def softmax_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    tile_size: Optional[int] = None,
    group=None,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Symmetric InfoNCE over the global batch, tiled and (if distributed) exchanged.

    ``logit_scale`` is the multiplier (already exponentiated).  Each rank passes its local
    rows; the mean over ranks of the returned loss is the full-batch loss and each rank's
    feature gradient is ``world_size x`` the single-process gradient of its rows (open_clip
    ``local_loss=True, gather_with_grad=True``).  Per-rank batch sizes may differ.
    ``exchange`` (``ring``, ``allgather`` or ``auto``: allgather when its buffers fit
    ``exchange_memory_mb`` MiB) only changes how blocks travel between ranks, not the
    result; see ``ring.py``.  ``backend`` (``auto``, ``torch``, ``triton``) picks who computes
    each block pair, ``tile_size`` the torch backend's tile edge (``None``: per device); see
    ``backend.py``.
    Returns ``(loss, {"loss", "pos_logit_mean", "neg_logit_mean"})``.
    """
    backend, tile_size = resolve_tiles(backend, tile_size, image_features)
    check_inputs(image_features, text_features, tile_size, logit_scale)
    ring = make_ring(image_features.shape[0], image_features.device, group, exchange=exchange,
                     row_bytes=exchange_row_bytes(image_features), memory_mb=exchange_memory_mb)
    tiles = _softmax_tiles(backend, int(tile_size))
    loss, sums = _TiledSoftmax.apply(image_features, text_features, logit_scale, tiles, ring)
    return loss, metrics_from_sums(loss, sums)
