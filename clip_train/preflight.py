"""Checks run at load time, before any model is built: every path a config names, and the rules
that need more than the config itself (the device, the model registry, the loss terms).

``clip-train`` calls :func:`preflight` right after parsing the config, so a wrong path or setting
costs seconds, not the hours of training before the first eval or checkpoint would have found it.
Each failure is a ``ConfigError`` whose message names the key and the value to change.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError


def preflight(cfg: Config, resume: str | None = None) -> None:
    """Raise ``ConfigError`` for the first problem found; cheap checks first."""
    _check_launch_env()
    _check_paths_exist(cfg)  # pathlib only: a wrong path is reported before open_clip is imported
    _check_train_data(cfg)
    _check_eval_sets(cfg)
    _check_resume(cfg, resume)
    _check_model(cfg)
    _check_objective_terms(cfg)
    _check_precision(cfg)


def _check_launch_env() -> None:
    import os

    from .engine.distributed import detect_env

    if detect_env().launcher == "slurm" and "MASTER_ADDR" not in os.environ:
        raise ConfigError("SLURM launch without MASTER_ADDR: export MASTER_ADDR and MASTER_PORT in the sbatch script")


def _check_paths_exist(cfg: Config) -> None:
    """The plain local paths a config names; patterns, URLs and contents are checked below."""
    for part in cfg.data.train.split("::") if cfg.data.train else []:
        if not any(marker in part for marker in ("{", "*", "://", "pipe:")) and not Path(part).exists():
            raise ConfigError(f"data.train={cfg.data.train!r}: shard not found: {part}")
    for key in ("zeroshot", "retrieval"):
        path = getattr(cfg.eval, key)
        if path and not Path(path).exists():
            raise ConfigError(f"eval.{key}={path!r}: dataset not found: {path}")
    _check_files(cfg)


def _check_train_data(cfg: Config) -> None:
    from .data.shards import DataError, expand_shards

    try:
        expand_shards(cfg.data.train)
    except DataError as err:
        raise ConfigError(f"data.train={cfg.data.train!r}: {err}") from None


def _check_eval_sets(cfg: Config) -> None:
    from .eval.datasets import resolve_classification_set, resolve_retrieval_shards
    from .eval.loading import EvalError

    for key, resolve in (("zeroshot", resolve_classification_set), ("retrieval", resolve_retrieval_shards)):
        path = getattr(cfg.eval, key)
        if not path:
            continue
        try:
            resolve(path)
        except EvalError as err:
            raise ConfigError(f"eval.{key}={path!r}: {err}") from None
    if cfg.eval.every and not cfg.eval.zeroshot:
        raise ConfigError(f"eval.every={cfg.eval.every} evaluates eval.zeroshot, which is not set: "
                          f"set eval.zeroshot to a classification set or eval.every=0")


def _check_files(cfg: Config) -> None:
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained: weights file not found: {cfg.model.pretrained} "
                          f"(a local .safetensors/.pt file; nothing is downloaded)")
    if cfg.ds.config_file:
        path = Path(cfg.ds.config_file)
        if not path.is_file():
            raise ConfigError(f"ds.config_file not found: {path}")
        try:
            if not isinstance(json.loads(path.read_text()), dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise ConfigError(f"ds.config_file {path}: not a DeepSpeed JSON config ({err})") from None


def _check_resume(cfg: Config, resume: str | None) -> None:
    if not resume:
        return
    from .engine.checkpoint import CheckpointError, resolve_checkpoint

    try:
        resolve_checkpoint(Path(cfg.output_dir), resume)
    except CheckpointError as err:
        raise ConfigError(f"--resume {resume}: {err}") from None


def _check_model(cfg: Config) -> None:
    from .models.builder import ModelError, resolve_model_config

    try:
        resolve_model_config(cfg.model.name)
    except ModelError as err:
        raise ConfigError(f"model.name={cfg.model.name!r}: {err}") from None


def _check_objective_terms(cfg: Config) -> None:
    from .losses.objective import TERMS

    unknown = [name for name in cfg.objective.terms if name not in TERMS]
    if unknown:
        raise ConfigError(f"objective.terms: unknown term {unknown[0]!r}; valid terms: {', '.join(TERMS.names())}")


def _check_precision(cfg: Config) -> None:
    import torch

    on_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.ds.precision == "fp16" and on_cpu:
        # DeepSpeed refuses fp16 on CPUs without AVX512-FP16 ("Type fp16 is not supported on your
        # device"), and only after the model is built; say it here, with the alternative.
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError("ds.precision=fp16: DeepSpeed does not run fp16 on this CPU; "
                              "use ds.precision=bf16 (or fp32), or train on a GPU")
