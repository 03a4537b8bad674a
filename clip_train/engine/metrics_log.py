"""Metrics to stdout and ``RUN/metrics.jsonl`` (one JSON object per logged step)."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        print(" ".join(_fmt(k, v) for k, v in clean.items()), flush=True)


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
