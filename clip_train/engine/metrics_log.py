"""Metrics to stdout, ``RUN/metrics.jsonl`` (one JSON object per logged step) and the trackers
of ``log.report_to`` (TensorBoard, wandb)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from .progress import duration
from .tracking import scalars

# Shown as durations on the console; the JSON keeps the seconds.
_DURATIONS = ("elapsed_s", "eta_s")


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, trackers: list | None = None,
                 printer: Callable[[str], None] | None = None, total_steps: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers = list(trackers or [])
        self.printer = printer or (lambda line: print(line, flush=True))
        self.total_steps = total_steps
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        for tracker in self.trackers:
            tracker.log(clean["step"], scalars(clean))
        self.printer(self._line(clean))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def _line(self, record: dict) -> str:
        parts = []
        for key, value in record.items():
            if key == "step" and self.total_steps:
                parts.append(f"step={value}/{self.total_steps}")
            elif key in _DURATIONS and isinstance(value, float):
                parts.append(f"{key[:-2]}={duration(value)}")
            else:
                parts.append(_fmt(key, value))
        return " ".join(parts)


def _plain(value):
    """Tensors become numbers; NaN and infinity become null, so every line is valid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(key: str, value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{key}={value:.4g}"
    return f"{key}={value}"
