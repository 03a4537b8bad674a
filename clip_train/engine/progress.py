"""Where a run is: elapsed time, time left (from a moving average of wall-clock step times,
data waits included) and, in an interactive terminal, a tqdm bar."""
from __future__ import annotations

import collections
import sys
import time

WINDOW = 50  # steps in the moving average: long enough to smooth noise, short enough to follow a change


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Call ``step_done`` after every optimizer step; ``fields`` gives what a log line shows."""

    def __init__(self, total_steps: int, start_step: int, bar: bool):
        self.total_steps = total_steps
        self.started = self._last = time.perf_counter()
        self._times: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="clip-train", file=sys.stdout,
                            dynamic_ncols=True)

    def step_done(self) -> None:
        now = time.perf_counter()
        self._times.append(now - self._last)
        self._last = now
        if self.bar is not None:
            self.bar.update()

    def fields(self, step: int) -> dict[str, float]:
        """``elapsed_s`` (this process) and ``eta_s`` (the moving-average step time x the steps left)."""
        mean = sum(self._times) / len(self._times) if self._times else 0.0
        return {"elapsed_s": time.perf_counter() - self.started, "eta_s": mean * (self.total_steps - step)}

    def write(self, line: str) -> None:
        """A log line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wants_bar(setting: str, world_size: int) -> bool:
    """log.progress: auto shows the bar only in a terminal with one rank (many ranks would interleave)."""
    if setting == "auto":
        return sys.stdout.isatty() and world_size == 1
    return setting == "on"


class ThroughputWindow:
    """Samples per second over the steps since the last logged one.

    ``samples_per_s`` is wall clock, data waits and epoch boundaries included (open_clip's
    figure: what the run really achieves); ``compute_samples_per_s`` counts only the time inside
    the training steps. Checkpoints and evaluations are side tasks, paused out of both.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.samples, self.compute_s, self.paused_s = 0, 0.0, 0.0

    def add_step(self, samples: int, seconds: float) -> None:
        self.samples += samples
        self.compute_s += seconds

    def pause(self, seconds: float) -> None:
        self.paused_s += seconds

    def rates(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started - self.paused_s
        return {"samples_per_s": self.samples / wall if wall > 0 else 0.0,
                "compute_samples_per_s": self.samples / self.compute_s if self.compute_s > 0 else 0.0}
