"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and wandb (``log.report_to``).

Each receives every logged record (training steps and evaluations) as scalars at its step, and
the config once as hyperparameters. Only rank 0 builds them. wandb runs offline unless the
config says otherwise, so nothing leaves the machine until the user runs ``wandb sync``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .run_summary import numeric_values


def scalars(record: dict) -> dict[str, float]:
    """The numeric, finite values of a record, but its step."""
    return {key: float(value) for key, value in numeric_values(record).items() if math.isfinite(value)}


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"optim.lr": 5e-4, ...}``: the config as one level of dotted keys."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in (dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node).items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(cfg, "")
    return flat


class TensorBoardWriter:
    """Scalars into ``RUN/tensorboard`` with the tensorboard package's event writer."""

    def __init__(self, run_dir: Path, cfg: Any):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        hyper = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config(cfg).items()}
        for summary in hparams(hyper, {}):  # the HParams tab, in this run's own event file
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """A wandb run in ``RUN/wandb`` (offline by default)."""

    def __init__(self, run_dir: Path, cfg: Any):
        import wandb

        self.run = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_name or run_dir.name,
                              dir=str(run_dir), mode=cfg.log.wandb_mode, config=flat_config(cfg), reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


WRITERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter}


def build_trackers(cfg: Any, run_dir: Path) -> list:
    return [WRITERS[name](run_dir, cfg) for name in cfg.log.report_to if name in WRITERS]
