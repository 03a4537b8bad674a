"""Block exchange shared by every distributed tiled loss: a ring, or one all-gather.

Rank ``r`` of a group of ``W`` ranks owns one block (its local rows).  A pass visits every
block ``q``: ``step(q, static_q, acc_q)`` processes it.  Two kinds of tensors belong to a
block:

* *static* tensors (features, saved statistics) that no rank modifies;
* *accumulators* that every rank adds its contribution to (column log-sum-exp in the softmax
  forward, feature gradients in the backward passes); the owner ends up with the merge of
  all ``W`` contributions.  Each accumulator declares how contributions merge: ``"sum"``
  (gradients, zero-initialised) or ``"logaddexp"`` (log-domain statistics, ``-inf``-initialised).

Two exchanges implement the same pass (:data:`EXCHANGES`):

``ring``
    ``W`` sequential hops.  At step ``k`` rank ``r`` holds the block of rank
    ``q = (r - k) mod W``; the next block's transfer is posted with ``batch_isend_irecv``
    *before* the current block is processed, so communication overlaps compute.
    Accumulators travel with their block (after each step) and are back at their owner,
    complete, after ``W`` transfers.  No rank ever holds more than its own block plus one
    block in flight: memory ``O(b D)``, but ``W - 1`` sequential block hops per pass (plus,
    with accumulators, ``W`` accumulator hops that do not overlap compute): latency-bound
    when ``W`` is large and ``b`` small.

``allgather``
    One all-gather (``all_gather_into_tensor``) of the static tensors, then ``step`` for
    every ``q`` locally (this rank's own block first, while the gather is in flight), then
    one ``all_to_all_single`` sends each block's accumulator contributions to its owner,
    which merges them with the declared op.  At most two collectives per pass whatever
    ``W``; memory ``O(B D)`` (the gathered static tensors, plus send and receive buffers of
    the accumulators).  Same maths, so the same losses and gradients as the ring up to
    float rounding (the order of the merges differs).

``auto`` (resolved once, in :func:`make_ring`) picks ``allgather`` when its buffers fit
``memory_mb``, else ``ring`` (see :func:`resolve_exchange`).

Blocks may have different lengths: the per-rank sizes are exchanged once (an
``all_gather`` of one integer per rank) so every buffer has the right shape; the
all-gather and all-to-all pad every block to the largest (gloo's all-gather needs equal
sizes).  All tensors of one exchange are packed into one byte matrix (``uint8`` views,
each tensor's bytes padded to a multiple of 8 so it can be viewed back in place), so the
number of collectives does not grow with the number of tensors or dtypes.  Works on any
process group (``group``), with collectives that gloo and NCCL both provide (tested on gloo).
Nothing here reads a device tensor on the host, except the one-off size exchange.

CUDA streams: no side stream is needed for the overlap.  With NCCL every ``isend`` / ``irecv`` /
collective runs on the process group's own communication stream, which first waits (an event) for
the work already queued on the current stream, and ``Work.wait()`` makes the *current stream*
wait for the transfer's event without blocking the host (c10d ``ProcessGroupNCCL``:
``WorkNCCL::synchronizeStream``).  So the block transfer posted before ``step`` runs on the NCCL
stream while ``step``'s kernels (torch or Triton) run on the compute stream, and ``_wait`` only
orders the next step after the transfer; ProcessGroupNCCL also keeps the sent tensors alive until
the transfer ends.  gloo on CPU has no streams; there ``_wait`` blocks the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

EXCHANGES = ("ring", "allgather", "auto")
"""Valid values of ``exchange`` (``loss.exchange`` in the config)."""
DEFAULT_EXCHANGE_MEMORY_MB = 1024.0
"""Default budget of ``auto`` (``loss.exchange_memory_mb``), in MiB."""
MERGES = {"sum": 0.0, "logaddexp": float("-inf")}
"""Accumulator merge operations and their identity (initial value)."""
# torch >= 2.14 renames all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Ring:
    """The blocks of a process group as seen from one rank, and how they are exchanged."""

    group: Optional[object]
    """Process group (``None``: no communication, single process)."""
    rank: int
    """This rank's index inside ``group``."""
    world: int
    """Number of ranks in ``group``."""
    sizes: tuple
    """Rows held by each rank, in group-rank order (the global batch is their concatenation)."""
    exchange: str = "ring"
    """``"ring"`` or ``"allgather"`` (already resolved: never ``"auto"``)."""

    @property
    def total(self) -> int:
        """Global batch size ``B``."""
        return sum(self.sizes)

    def global_rank(self, q: int) -> int:
        """Global rank of group rank ``q`` (P2P peers are addressed by global rank)."""
        if self.group is None or self.group is dist.group.WORLD:
            return q
        return dist.get_global_rank(self.group, q)

    def gather_scalar(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather a scalar from every rank; returns a ``(world,)`` tensor."""
        x = x.detach().reshape(1)
        if self.world == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x, group=self.group)
        return torch.cat(out)


def allgather_bytes(sizes: Sequence[int], row_bytes: int) -> int:
    """Bytes the ``allgather`` exchange holds at once: ``W x max(sizes)`` padded rows (``B``
    for equal per-rank sizes) times ``row_bytes``."""
    return len(sizes) * max(sizes) * int(row_bytes)


def _check_exchange(exchange: str, memory_mb: float) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}: use one of {', '.join(EXCHANGES)}")
    if not float(memory_mb) >= 0:
        raise ValueError(f"exchange_memory_mb must be >= 0, got {memory_mb}")


def resolve_exchange(exchange: str, sizes: Sequence[int], row_bytes: int,
                     memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB) -> str:
    """``"ring"`` or ``"allgather"`` for ``exchange`` in :data:`EXCHANGES`.

    ``auto`` chooses ``allgather`` when :func:`allgather_bytes` ``(sizes, row_bytes) <=
    memory_mb * 2**20``, else ``ring``.  ``row_bytes`` is what the loss term holds per
    gathered row at the peak of its passes: the width x element size of every static tensor
    of the pass plus twice that of every accumulator (send and receive buffers), the largest
    over forward and backward (see :func:`pass_row_bytes`); e.g. ``4 D + 8 + 2 x 4 D`` for
    the float32 softmax backward (features and the column log-sum-exp gathered, float32
    feature gradients sent and received).  The budget is per term and per pass (the buffers
    are freed at the end of each pass); tiles and the ``O(b D)`` local state come on top.
    The inputs (global sizes after the size exchange, ``D``, dtypes) are the same on every
    rank, so every rank makes the same choice without a collective.
    """
    _check_exchange(exchange, memory_mb)
    if exchange != "auto":
        return exchange
    fits = allgather_bytes(sizes, row_bytes) <= float(memory_mb) * 2 ** 20
    return "allgather" if fits else "ring"


def _padded(nbytes: int) -> int:
    return -(-int(nbytes) // 8) * 8


def pass_row_bytes(static: Sequence[tuple] = (), acc: Sequence[tuple] = ()) -> int:
    """Bytes per gathered row of one ``allgather`` pass: ``static`` and ``acc`` are
    ``(width, dtype)`` of its tensors (width = elements per row, 1 for a per-row statistic);
    accumulators count twice (send and receive buffers).  Each tensor's row is padded to a
    multiple of 8 bytes, as in the packed buffers."""
    size = lambda w, dt: _padded(int(w) * torch.empty((), dtype=dt).element_size())  # noqa: E731
    return sum(size(w, dt) for w, dt in static) + 2 * sum(size(w, dt) for w, dt in acc)


def make_ring(n_local: int, device: torch.device, group=None, *, exchange: str = "ring", row_bytes: int = 0,
              memory_mb: float = DEFAULT_EXCHANGE_MEMORY_MB) -> Ring:
    """Build the :class:`Ring` for ``group`` (default: the world group if initialised), with
    ``exchange`` resolved by :func:`resolve_exchange` (``row_bytes`` only matters for ``auto``).
    This low-level helper defaults to ``ring``; the public losses default to ``auto``."""
    _check_exchange(exchange, memory_mb)  # here too: a bad value fails single-process as well
    if not (dist.is_available() and dist.is_initialized()):
        return Ring(None, 0, 1, (n_local,))
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return Ring(None, 0, 1, (n_local,))
    size = torch.tensor([n_local], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = tuple(int(s) for s in sizes)
    mode = resolve_exchange(exchange, sizes, row_bytes, memory_mb)
    return Ring(group, dist.get_rank(group), world, sizes, mode)


def _post_shift(ring: Ring, tensors: Sequence[torch.Tensor], n_in: int):
    """Send ``tensors`` to rank r+1 and receive same-shaped tensors with ``n_in`` rows
    from rank r-1, asynchronously.  Returns ``(receive buffers, requests)``."""
    nxt = ring.global_rank((ring.rank + 1) % ring.world)
    prv = ring.global_rank((ring.rank - 1) % ring.world)
    bufs, ops = [], []
    for tag, t in enumerate(tensors):
        buf = t.new_empty((n_in,) + tuple(t.shape[1:]))
        bufs.append(buf)
        ops.append(dist.P2POp(dist.isend, t.contiguous(), nxt, ring.group, tag))
        ops.append(dist.P2POp(dist.irecv, buf, prv, ring.group, tag))
    return bufs, dist.batch_isend_irecv(ops)


def _wait(pending):
    bufs, reqs = pending
    for req in reqs:
        req.wait()
    return bufs


def _ring_pass(ring, static, acc, step) -> list:
    acc = list(acc)
    cur = list(static)
    for k in range(ring.world):
        q = (ring.rank - k) % ring.world
        n_in = ring.sizes[(q - 1) % ring.world]
        # Post the next block's transfer first: it overlaps this block's compute.
        pending = _post_shift(ring, cur, n_in) if k < ring.world - 1 else None
        step(q, cur, acc)
        if pending is not None:
            cur = _wait(pending)
        if acc and ring.world > 1:
            # Accumulators change during step(), so they travel after it.
            acc = _wait(_post_shift(ring, acc, n_in))
    return acc


class _Layout:
    """Byte layout of a list of per-row tensors packed side by side in one ``uint8`` matrix."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.specs, self.offsets, off = [], [], 0
        for t in tensors:
            trailing = tuple(t.shape[1:])
            width = 1
            for d in trailing:
                width *= d
            nbytes = width * t.element_size()
            self.specs.append((t.dtype, trailing, nbytes))
            self.offsets.append(off)
            off += _padded(nbytes)  # keep every piece 8-byte aligned: views, no copies
        self.row_bytes = off

    def pack_into(self, buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (``n`` rows each) into the first ``n`` rows of ``buf``."""
        for t, off, (_, _, nb) in zip(tensors, self.offsets, self.specs):
            n = t.shape[0]
            buf[:n, off:off + nb].copy_(t.detach().reshape(n, -1).contiguous().view(torch.uint8))

    def views(self, buf: torch.Tensor, n: int) -> list:
        """The tensors stored in the first ``n`` rows of ``buf`` (``[..., rows, row_bytes]``),
        as views of it."""
        out = []
        for off, (dtype, trailing, nb) in zip(self.offsets, self.specs):
            piece = buf[..., :n, off:off + nb].view(dtype)
            out.append(piece.unflatten(-1, trailing) if trailing else piece.squeeze(-1))
        return out


def _allgather_pass(ring, static, acc, step, merge) -> list:
    W, rank, n_max = ring.world, ring.rank, max(ring.sizes)
    device = (static[0] if static else acc[0]).device
    pending = None
    if static:
        st_layout = _Layout(static)
        send = torch.zeros((n_max, st_layout.row_bytes), dtype=torch.uint8, device=device)
        st_layout.pack_into(send, static)
        gathered = send.new_empty((W * n_max, st_layout.row_bytes))
        pending = _all_gather_flat(gathered, send, group=ring.group, async_op=True)
        gathered = gathered.view(W, n_max, -1)
    if acc:
        # Contributions to every block, written in place by step() into views of the
        # all-to-all send buffer; identity-initialised, this rank's slot from the caller.
        acc_layout = _Layout(acc)
        contrib = torch.zeros((W, n_max, acc_layout.row_bytes), dtype=torch.uint8, device=device)
        slots = [acc_layout.views(contrib[q], ring.sizes[q]) for q in range(W)]
        for q in range(W):
            for view, op, own in zip(slots[q], merge, acc):
                if q == rank:
                    view.copy_(own)
                else:
                    view.fill_(MERGES[op])
    else:
        slots = [[] for _ in range(W)]
    step(rank, list(static), slots[rank])  # own block: overlaps the gather
    if pending is not None:
        pending.wait()
    for q in range(W):
        if q != rank:
            blk = st_layout.views(gathered[q], ring.sizes[q]) if static else []
            step(q, blk, slots[q])
    if not acc:
        return []
    received = torch.empty_like(contrib)
    dist.all_to_all_single(received.view(W * n_max, -1), contrib.view(W * n_max, -1), group=ring.group)
    parts = acc_layout.views(received, ring.sizes[rank])  # each (W, n_rank, ...)
    merged = []
    for part, op, own in zip(parts, merge, acc):
        out = part.sum(0) if op == "sum" else part.logsumexp(0)
        merged.append(out.to(own.dtype).reshape(own.shape))
    return merged


def ring_loop(
    ring: Ring,
    static: Sequence[torch.Tensor],
    acc: Sequence[torch.Tensor],
    step: Callable[[int, Sequence[torch.Tensor], Sequence[torch.Tensor]], None],
    merge: Sequence[str] = (),
) -> list:
    """Visit every rank's block once; return this rank's own (completed) accumulators.

    ``static`` and ``acc`` are lists of this rank's block tensors (first dimension = its
    row count); ``step(q, static_q, acc_q)`` processes block ``q`` and adds into the
    ``acc_q`` tensors in place (in the ``allgather`` exchange they are strided views of a
    send buffer: write into them, do not rebind them).  ``merge`` names, for each
    accumulator, how contributions combine (``"sum"`` or ``"logaddexp"``, see
    :data:`MERGES`); the caller initialises its own accumulators with that identity.  The
    exchange is ``ring.exchange`` (see the module docstring).  With ``world == 1`` this is
    one local call, no communication.
    """
    merge = tuple(merge)
    if len(merge) != len(acc) or any(op not in MERGES for op in merge):
        raise ValueError(f"ring_loop: one merge op per accumulator from {sorted(MERGES)}, got {merge}")
    if ring.world == 1:
        acc = list(acc)
        step(ring.rank, list(static), acc)
        return acc
    if ring.exchange == "allgather":
        return _allgather_pass(ring, static, acc, step, merge)
    return _ring_pass(ring, static, acc, step)
