"""Tiled, ring-distributed pairwise sigmoid (SigLIP) loss without the B x B logits.

With ``S_ij = s a_i.b_j``, bias ``t`` and ``z_ij = +1`` if ``i = j`` else ``-1``:

    L = -1/B sum_ij log sigmoid(z_ij (S_ij + t))
      =  1/B [ sum_ij softplus(S_ij + t) - sum_i (S_ii + t) ]

(using ``-log sigmoid(-x) = softplus(x)`` and ``log sigmoid(x) - log sigmoid(-x) = x``),
so every tile is treated as all-negative and the diagonal is corrected analytically.

Normalisation (matches open_clip ``SigLipLoss`` exactly): open_clip divides each rank's
sum over (local rows) x (all columns) by the *local* batch size ``b``; single process that
is ``1/B`` as above.  Rank ``r`` here returns ``L_r = W/B [sum_{i in r, all j}
softplus(S_ij + t) - sum_{i in r} (S_ii + t)]``: ``W/B = 1/b`` when ranks hold equal
batches, and for uneven batches it keeps ``mean_r L_r = L`` (the full-batch loss).

Backward (tiles recomputed), with ``c = g_r W/B``:
``dL_r/dS_ij = c (sigmoid(S_ij + t) - delta_ij)``, ``dL/dt = sum_ij G_ij``,
``dL/ds = sum_ij G_ij a_i.b_j``; text gradients accumulate on the ring and travel home
(each rank's feature gradient is ``W x`` the single-process one, as with open_clip's
exchange-with-grad), scale and bias gradients are ``d(g_r L_r)/d(s, t)`` per rank.
Peak extra memory ``O(T^2 + b D)``.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .ring import DEFAULT_EXCHANGE_MEMORY_MB, Ring, make_ring, ring_loop
from .tiled_softmax import (
    acc_mm, check_inputs, exchange_row_bytes, logit_sums, metrics_from_sums, resolve_tiles, rowwise_dot,
    scalar_on_device, scaled_logits, stat_dtype, tile_ranges,
)


def _softplus_tiles(a, b, s, t, out, tile):
    """``out += sum softplus(s a b^T + t)`` over tiles."""
    st = out.dtype
    for j0, j1 in tile_ranges(b.shape[0], tile):
        bj = b[j0:j1]
        for i0, i1 in tile_ranges(a.shape[0], tile):
            out += F.softplus(scaled_logits(a[i0:i1], bj, s, st, t)).sum()


def _grad_tiles(a, b, s, t, c, ga_u, gb_u, sig_sum, tile):
    """With ``P = sigmoid(S + t)``: ``ga_u += c P b``, ``gb_u += c P^T a`` (travelling
    block), ``sig_sum += sum P``.  Diagonal, bias/scale gradients and ``s`` by the caller."""
    st = ga_u.dtype
    for j0, j1 in tile_ranges(b.shape[0], tile):
        bj = b[j0:j1]
        for i0, i1 in tile_ranges(a.shape[0], tile):
            ai = a[i0:i1]
            P = scaled_logits(ai, bj, s, st, t).sigmoid_()
            sig_sum += P.sum()
            acc_mm(ga_u[i0:i1], P, bj, c)
            acc_mm(gb_u[j0:j1], P.T, ai, c)


def _sigmoid_tiles(backend: str, tile: int):
    if backend == "triton":
        from . import triton_tiles  # imported on first use: see backend.py

        return triton_tiles.sigmoid_softplus_tiles, triton_tiles.sigmoid_grad_tiles
    return partial(_softplus_tiles, tile=tile), partial(_grad_tiles, tile=tile)


class _TiledSigmoid(torch.autograd.Function):
    """Returns ``(loss_r, metric sums)``; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, tiles, ring: Ring):
        # tiles = (softplus_tiles, grad_tiles): the torch loops above or triton_tiles' kernels.
        st = stat_dtype(a.dtype)
        s, t = scalar_on_device(scale, st), scalar_on_device(bias, st)
        total = torch.zeros((), dtype=st, device=a.device)
        b_sum = torch.zeros(a.shape[1], dtype=st, device=a.device)

        def step(q, blk, _acc):
            tiles[0](a, blk[0], s, t, total)
            b_sum.add_(blk[0].sum(0, dtype=st))

        ring_loop(ring, [b], [], step)
        diag = s * rowwise_dot(a, b, st) + t
        loss = (total - diag.sum()) * (ring.world / ring.total)
        ctx.save_for_backward(a, b, scale, bias)
        ctx.tiles, ctx.ring = tiles, ring
        # Metric sums include the bias: logits are S + t (n_r * B * t over all pairs).
        sums = logit_sums(a, b_sum, diag - t, s, ring.total)
        n = a.shape[0]
        sums = sums + torch.stack([n * t, n * (ring.total - 1) * t, t.new_zeros(()), t.new_zeros(())])
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, g, _unused):
        a, b, scale, bias = ctx.saved_tensors
        ring, st = ctx.ring, stat_dtype(a.dtype)
        s, t = scalar_on_device(scale, st), scalar_on_device(bias, st)
        c = g.detach().to(st) * (ring.world / ring.total)  # a device scalar, never read on the host
        ga_u = torch.zeros(a.shape, dtype=st, device=a.device)
        gb_u = torch.zeros(b.shape, dtype=st, device=a.device)
        sig_sum = torch.zeros((), dtype=st, device=a.device)

        def step(q, blk, acc_q):
            ctx.tiles[1](a, blk[0], s, t, c, ga_u, acc_q[0], sig_sum)

        (gb_u,) = ring_loop(ring, [b], [gb_u], step, merge=["sum"])
        # Diagonal: dL_r/dS_ii gets an extra -c (the positive pair's label).
        ga_u.sub_(b.to(st) * c)
        gb_u.sub_(a.to(st) * c)
        # dL/dt = sum_ij G_ij;  dL/ds = sum_ij G_ij a_i.b_j = sum_i a_i.(G b)_i.
        g_bias = c * sig_sum - c * a.shape[0]
        g_scale = torch.vdot(a.to(st).flatten(), ga_u.flatten())
        ga, gb = ga_u.mul_(s), gb_u.mul_(s)
        return (ga.to(a.dtype), gb.to(b.dtype), g_scale.to(scale.dtype).reshape(scale.shape),
                g_bias.to(bias.dtype).reshape(bias.shape), None, None)


def sigmoid_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    tile_size: Optional[int] = None,
    group=None,
    exchange: str = "auto",
    exchange_memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """SigLIP loss over the global batch, tiled and (if distributed) exchanged.

    Same conventions (and ``exchange`` / ``exchange_memory_mb`` / ``backend`` / ``tile_size``) as
    :func:`softmax_contrastive_loss`; ``logit_bias`` is the learnable bias ``t``.  Returns
    ``(loss, {"loss", "pos_logit_mean", "neg_logit_mean"})`` where the logit means include
    the bias.
    """
    backend, tile_size = resolve_tiles(backend, tile_size, image_features)
    check_inputs(image_features, text_features, tile_size, logit_scale, logit_bias)
    ring = make_ring(image_features.shape[0], image_features.device, group, exchange=exchange,
                     row_bytes=exchange_row_bytes(image_features, 0, 0), memory_mb=exchange_memory_mb)
    tiles = _sigmoid_tiles(backend, int(tile_size))
    loss, sums = _TiledSigmoid.apply(image_features, text_features, logit_scale, logit_bias, tiles, ring)
    return loss, metrics_from_sums(loss, sums)
