"""Run control shared by all ranks: the stop request (SIGTERM/SIGUSR1) that every rank acts on at
the same step, agreed without stalling the accelerator.

A flag read back from a CUDA tensor after an NCCL all-reduce waits for every kernel queued before
it: one pipeline stall per step. Here the flag is a CPU tensor reduced over a separate gloo group,
started asynchronously at one step and read at the next, so the device never waits for it and the
network round trip overlaps a whole step. Every rank polls once per step, so every rank reads the
same reduced value at the same step and stops together (one step after the signal arrived).
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """``poll()`` once per step on every rank; True on all ranks once any rank got a stop signal."""

    def __init__(self, distributed: bool):
        self.signal: int | None = None
        self.group = dist.new_group(backend="gloo") if distributed else None
        self._pending: tuple | None = None
        self._previous_handlers: dict = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum  # acted on at a step boundary, on every rank together

    def poll(self) -> bool:
        """Start this step's agreement and return the previous step's (False at the first poll)."""
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([0.0 if self.signal is None else 1.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        previous, self._pending = self._pending, (work, flag)
        return self._read(previous)

    def finish(self) -> bool:
        """Wait for the last poll (so no collective is left in flight) and return its value."""
        previous, self._pending = self._pending, None
        return self._read(previous)

    def _read(self, pending: tuple | None) -> bool:
        if pending is None:
            return False
        work, flag = pending
        work.wait()
        stop = bool(flag.item())  # a CPU tensor: no device synchronisation
        if stop and self.signal is None:
            self.signal = signal.SIGTERM  # another rank was signalled
        return stop
