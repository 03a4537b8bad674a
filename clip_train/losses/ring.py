"""Point-to-point ring helpers shared by the tiled softmax and sigmoid losses.

Rank ``r`` of a ring of ``W`` ranks owns one block (its local rows).  A pass around
the ring visits every block: at step ``k`` rank ``r`` holds the block of rank
``q = (r - k) mod W``.  Two kinds of tensors travel with a block:

* *static* tensors (features, saved statistics) that no rank modifies: the transfer of
  the next block is posted with ``batch_isend_irecv`` *before* the current block is
  processed, so communication overlaps compute;
* one *accumulator* that every rank adds its contribution to (column log-sum-exp in the
  softmax forward, feature gradients in the backward passes).  It is passed on after
  each step; after ``W`` steps (``W`` transfers) it is back at its owner, complete.

No rank ever holds more than its own block plus one block in flight.  Blocks may have
different lengths: the per-rank sizes are exchanged once (an ``all_gather`` of one
integer per rank) so every receive buffer has the right shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ring:
    """The ring of a process group as seen from one rank."""

    group: Optional[object]
    """Process group (``None``: no communication, single process)."""
    rank: int
    """This rank's index inside ``group``."""
    world: int
    """Number of ranks in ``group``."""
    sizes: tuple
    """Rows held by each rank, in group-rank order (the global batch is their concatenation)."""

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


def make_ring(n_local: int, device: torch.device, group=None) -> Ring:
    """Build the :class:`Ring` for ``group`` (default: the world group if initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ring(None, 0, 1, (n_local,))
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return Ring(None, 0, 1, (n_local,))
    size = torch.tensor([n_local], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return Ring(group, dist.get_rank(group), world, tuple(int(s) for s in sizes))


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


def ring_loop(
    ring: Ring,
    static: Sequence[torch.Tensor],
    acc: Sequence[torch.Tensor],
    step: Callable[[int, Sequence[torch.Tensor], Sequence[torch.Tensor]], None],
) -> list:
    """Visit every rank's block once; return this rank's own (completed) accumulators.

    ``static`` and ``acc`` are lists of this rank's block tensors (first dimension = its
    row count); ``step(q, static_q, acc_q)`` processes block ``q`` and adds into the
    ``acc_q`` tensors in place.  With ``world == 1`` this is one local call, no
    communication.
    """
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
