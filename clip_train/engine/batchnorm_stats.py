"""BatchNorm running statistics for GradCache: one update per step, from the whole batch.

GradCache (:mod:`.gradcache`) runs every micro-batch forward twice in training mode (encode,
then replay), so each BatchNorm layer would update ``running_mean`` / ``running_var`` /
``num_batches_tracked`` ``2 k`` times per step, each time from one micro-batch of ``m`` rows
instead of once from the ``B = m k`` rows of the batch.  :class:`BatchNormStatsRecorder` undoes
that: during the encode pass a forward pre-hook on every ``_BatchNorm`` layer records, per
micro-batch, the float64 moments of the layer's input (element count ``n_i``, mean ``mu_i``,
sum of squared deviations ``M2_i``, per channel, over the batch and any spatial dims), and the
running buffers as they were at the layer's first call; after the replays it writes back what
one training-mode call over the concatenated input would have written:

    n = sum n_i,   mu = sum n_i mu_i / n,   M2 = sum M2_i + sum n_i (mu_i - mu)^2
    f = momentum, or 1 / num_batches_tracked (after its increment) when momentum is None
    running_mean <- (1 - f) running_mean + f mu
    running_var  <- (1 - f) running_var  + f M2 / (n - 1)      (unbiased, as torch does)
    num_batches_tracked += 1

What "the concatenated input" means.  The forward *normalisation* inside each micro-batch still
uses that micro-batch's statistics: that is inherent to GradCache (the full batch's activations
never exist at once).  So a BatchNorm whose input does not depend on an earlier BatchNorm (a
tower's first one, the audio tower's ``spec_norm``) sees exactly the rows a full-batch forward
would give it, and ends with exactly the full-batch step's statistics; a deeper one sees
activations normalised per micro-batch, and ends with the statistics of one update over the
concatenation of *those* inputs.  Either way it is one update from all ``B`` rows, not ``2 k``
from ``m`` rows.  A layer called ``c`` times per forward (a shared module) gets ``c`` sequential
updates, call ``j`` combining every micro-batch's call ``j``, as one forward would.

Only layers in training mode with ``track_running_stats=True`` are touched (a layer in eval mode
does not update its buffers in the first place), and only if they were called.  Anything else
that re-runs the forward between the encode pass and the write-back (the replays, activation
checkpointing's recompute in backward) is overwritten too.

Distributed.  Without SyncBatchNorm the statistics are per rank, so each rank combines its own
micro-batches and nothing is communicated; SyncBatchNorm across ranks is refused (it would need
the moments all-gathered).  DDP with ``broadcast_buffers=True`` copies rank 0's buffers into
every rank at each forward: the snapshot is taken at the layer's first call, i.e. *after* that
broadcast, so the result is rank 0's buffers updated with this rank's batch, as in a plain DDP
step.  DeepSpeed ZeRO (any stage) does not partition buffers, so writing them in place is fine.
Buffers in a lower precision (bf16 under DeepSpeed) are updated in float64 and rounded once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

CHANNEL_DIM = 1  # BatchNorm{1,2,3}d: (N, C, *spatial); statistics are per channel


@dataclass(frozen=True)
class Moments:
    """Per-channel moments of a set of elements, in float64."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor  # sum of squared deviations from ``mean``


def input_moments(x: torch.Tensor) -> Moments:
    """The moments BatchNorm computes over its input: every dim but the channel dim."""
    x = x.detach().to(torch.float64)  # float64: the combination below must not lose the low bits
    dims = [d for d in range(x.dim()) if d != CHANNEL_DIM]
    count = x.numel() // x.shape[CHANNEL_DIM]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return Moments(count, mean, var * count)


def combine_moments(parts: list[Moments]) -> Moments:
    """Moments of the union of the parts (Chan et al.'s parallel variance formula), so the
    full batch's statistics come out without ever holding the full batch."""
    count = sum(p.count for p in parts)
    mean = sum(p.count * p.mean for p in parts) / count
    m2 = sum(p.m2 + p.count * (p.mean - mean) ** 2 for p in parts)
    return Moments(count, mean, m2)


@dataclass(frozen=True)
class RunningStats:
    mean: torch.Tensor
    var: torch.Tensor
    batches: torch.Tensor  # a device tensor like the buffer: reading it would stall a GPU


def snapshot(module: _BatchNorm) -> RunningStats:
    return RunningStats(module.running_mean.detach().clone(), module.running_var.detach().clone(),
                        module.num_batches_tracked.detach().clone())


def updated_stats(before: RunningStats, momentum: Optional[float], calls: list[Moments]) -> RunningStats:
    """The buffers after one training-mode call per entry of ``calls``, in order, computed the
    way ``torch.nn.functional.batch_norm`` does (momentum ``None``: cumulative average)."""
    mean, var, batches = before.mean.to(torch.float64), before.var.to(torch.float64), before.batches
    for moments in calls:
        batches = batches + 1
        factor = 1.0 / batches.to(torch.float64) if momentum is None else momentum
        mean = (1 - factor) * mean + factor * moments.mean
        var = (1 - factor) * var + factor * moments.m2 / (moments.count - 1)
    return RunningStats(mean, var, batches)


def write_stats(module: _BatchNorm, stats: RunningStats) -> None:
    with torch.no_grad():  # in place: optimizer / DeepSpeed hold references to these buffers
        module.running_mean.copy_(stats.mean)
        module.running_var.copy_(stats.var)
        module.num_batches_tracked.copy_(stats.batches)


@dataclass
class LayerRecord:
    name: str
    before: Optional[RunningStats] = None  # the buffers at the layer's first call this step
    calls: list = field(default_factory=list)  # per micro-batch: the Moments of each call, in order


def tracked_layers(model: Optional[torch.nn.Module]) -> dict:
    """``{module: name}`` for every BatchNorm that keeps running statistics; none for ``None``."""
    if model is None:
        return {}
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            check_not_cross_rank(name, module)
            layers[module] = name
    return layers


def check_not_cross_rank(name: str, module: _BatchNorm) -> None:
    """A SyncBatchNorm that syncs across ranks computes global statistics; combining this
    rank's micro-batches alone would be wrong, so refuse rather than silently drift."""
    if not (isinstance(module, SyncBatchNorm) and module.training and dist.is_available()
            and dist.is_initialized()):
        return
    if dist.get_world_size(module.process_group) > 1:
        raise NotImplementedError(
            f"GradCache cannot reconstruct the running statistics of SyncBatchNorm {name!r} across "
            "ranks; use per-rank BatchNorm or a single micro-batch")


class BatchNormStatsRecorder:
    """Records BatchNorm input moments during GradCache's encode pass and writes back the
    full-batch update at the end of the step (see the module docstring).

    Use::

        recorder = BatchNormStatsRecorder(model)       # model None: records nothing
        with recorder.recording():
            encode(recorder.per_micro_batch(forward), micro_batches)
        ...                                              # replays (update the buffers again)
        recorder.write_full_batch_update()
    """

    def __init__(self, model: Optional[torch.nn.Module]):
        self.layers = {module: LayerRecord(name) for module, name in tracked_layers(model).items()}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks on only while inside: the replays must not be recorded a second time."""
        handles = [m.register_forward_pre_hook(self._record, with_kwargs=True) for m in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def per_micro_batch(self, forward: Callable) -> Callable:
        """``forward`` that opens a new micro-batch slot before running, so each call's
        moments are attributed to the micro-batch that produced them."""
        def wrapped(micro_batch):
            for record in self.layers.values():
                record.calls.append([])
            return forward(micro_batch)
        return wrapped

    def _record(self, module: _BatchNorm, args: tuple, kwargs: dict) -> None:
        if not module.training:  # eval-mode BatchNorm leaves its buffers alone
            return
        record = self.layers[module]
        if record.before is None:  # before the first update, after any DDP buffer broadcast
            record.before = snapshot(module)
        record.calls[-1].append(input_moments(args[0] if args else kwargs["input"]))

    def write_full_batch_update(self) -> None:
        """Replace whatever the passes left in the buffers by the one full-batch update."""
        for module, record in self.layers.items():
            if record.before is None:  # never called in training mode: nothing to undo
                continue
            calls = full_batch_calls(record)
            write_stats(module, updated_stats(record.before, module.momentum, calls))


def full_batch_calls(record: LayerRecord) -> list[Moments]:
    """Call ``j`` of the full-batch forward = call ``j`` of every micro-batch, combined.  A
    different call count per micro-batch (data-dependent control flow) has no full-batch
    equivalent, so it is an error rather than a guess."""
    counts = [len(calls) for calls in record.calls]
    if len(set(counts)) != 1:
        raise RuntimeError(
            f"BatchNorm {record.name!r} was called {counts} times in the micro-batches' forwards; "
            "its full-batch running statistics are undefined")
    return [combine_moments(list(parts)) for parts in zip(*record.calls)]
