"""Turning a failure inside a (distributed) run into one line that says what happened, and where.

A rank whose peer died, hung or ran out of memory sees a failed collective: a connection reset, a
closed pair, or a timeout after ``train.dist_timeout_s``. That is told apart from every other error
(a dtype mismatch, CUDA out of memory, a bug), which keeps its own message: calling those "another
rank died" would send the user to the wrong log.
"""
from __future__ import annotations

import torch.distributed as dist

# Substrings of the messages gloo and NCCL raise when a peer goes away or a collective times out.
_COLLECTIVE_MARKERS = ("connection reset", "connection closed", "connection refused", "broken pipe",
                       "timed out", "timeout", "watchdog", "nccl communicator was aborted", "socket",
                       "read error", "write error", "peer")
_MAX_MESSAGE = 400


def is_collective_failure(err: BaseException) -> bool:
    """True for torch.distributed's own errors and for gloo/NCCL runtime errors about peers."""
    dist_errors = tuple(t for t in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                                    getattr(dist, "DistNetworkError", None)) if t is not None)
    if dist_errors and isinstance(err, dist_errors):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(marker in text for marker in _COLLECTIVE_MARKERS) \
        and not _is_out_of_memory(text)


def _is_out_of_memory(text: str) -> bool:
    return "out of memory" in text


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    line = text.splitlines()[0]
    return line if len(line) <= _MAX_MESSAGE else line[:_MAX_MESSAGE] + "..."


def describe_failure(err: BaseException, rank: int, phase: str, says_what_to_change: bool = False) -> str:
    """The one-line report: ``rank R: <what> during <phase>: <message>``; an error whose message
    already says what to change (``says_what_to_change``, our own kinds) is given as it is."""
    if is_collective_failure(err):
        return (f"rank {rank}: a collective operation failed during {phase} ({first_line(err)}); another rank "
                f"probably died or hung (see its log); resume with --resume latest")
    if says_what_to_change:
        return str(err)
    return f"rank {rank}: {type(err).__name__} during {phase}: {first_line(err)} (traceback in the log above)"
