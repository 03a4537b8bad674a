"""``RUN/summary.json``, written at the end of a run from its ``metrics.jsonl`` and the trainer's totals."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# Logged with every training step but not the loss or one of its terms.
TRAIN_FIELDS = frozenset({"step", "epoch", "lr", "logit_scale", "logit_bias", "samples_per_s", "compute_samples_per_s",
                          "skipped", "skipped_steps", "elapsed_s", "eta_s"})


def is_train_record(record: dict) -> bool:
    return "loss" in record


def numeric_values(record: dict) -> dict[str, float]:
    """A record's numbers (not booleans), but its step."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_values(record: dict) -> dict[str, float]:
    """An evaluation record's metrics (every one of them: higher is better)."""
    return numeric_values(record)


def loss_terms(record: dict) -> dict:
    """A training record's objective terms, the total ``loss`` included (a non-finite one is None
    in metrics.jsonl); a term's own diagnostics (``contrastive/pos_logit_mean``) are left out."""
    return {k: v for k, v in record.items() if k not in TRAIN_FIELDS and "/" not in k}


def best_evals(records: list[dict]) -> dict[str, dict[str, Any]]:
    """For each eval metric, its highest value and the step it was reached at (the first, on a tie)."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        if is_train_record(record):
            continue
        for key, value in eval_values(record).items():
            if key not in best or value > best[key]["value"]:
                best[key] = {"value": value, "step": record["step"]}
    return best


def build_summary(records: list[dict], totals: dict[str, Any]) -> dict[str, Any]:
    train = [r for r in records if is_train_record(r)]
    evals = [r for r in records if not is_train_record(r) and eval_values(r)]
    last = train[-1] if train else {}
    return {
        **totals,
        "final_train": {k: last[k] for k in ("loss", "lr", "logit_scale") if k in last},
        "final_eval": eval_values(evals[-1]) if evals else {},
        "best_eval": best_evals(records),
    }


def write_summary(run_dir: Path, totals: dict[str, Any]) -> dict[str, Any]:
    summary = build_summary(read_metrics(run_dir), totals)
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
