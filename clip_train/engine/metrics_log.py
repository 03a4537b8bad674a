"""Metrics to stdout, ``RUN/metrics.jsonl`` (one JSON object per logged step) and the trackers
of ``log.report_to`` (TensorBoard, wandb)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from .progress import duration
from .run_summary import loss_terms
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
        """A short console line; ``metrics.jsonl`` keeps every value.

        Training: ``step 20/330  epoch 1  loss 4.766  lr 0.001333  scale 14.17  369 samples/s  elapsed 16s
        eta 4m05s``, the terms only when there are several, skips only when there are some.
        Evaluation: ``step 20/330  zeroshot/acc1=0.83 ...``.
        """
        step = f"step {record['step']}/{self.total_steps}" if self.total_steps else f"step {record['step']}"
        if "loss" not in record:
            return "  ".join([step, *(_fmt(k, v) for k, v in record.items() if k != "step")])
        parts = [step, f"epoch {record.get('epoch')}", f"loss {_num(record['loss'])}"]
        terms = {k: v for k, v in loss_terms(record).items() if k != "loss"}
        if len(terms) > 1:
            parts.append("(" + ", ".join(f"{k} {_num(v)}" for k, v in terms.items()) + ")")
        parts += [f"lr {_num(record.get('lr'))}", f"scale {_num(record.get('logit_scale'))}"]
        if "logit_bias" in record:
            parts.append(f"bias {_num(record['logit_bias'])}")
        if isinstance(record.get("samples_per_s"), float):
            rate = record["samples_per_s"]
            parts.append(f"{rate:.0f} samples/s" if rate >= 100 else f"{rate:.3g} samples/s")
        for key, label in (("skipped", "skipped samples"), ("skipped_steps", "skipped steps")):
            if record.get(key):
                parts.append(f"{label} {record[key]}")
        for key in _DURATIONS:
            if isinstance(record.get(key), float):
                parts.append(f"{key[:-2]} {duration(record[key])}")
        return "  ".join(parts)


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


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
