"""Checks run at load time, before any model is built: every path a config names, and the rules
that need more than the config itself (the launch environment, the device, the model registry,
the loss terms).

``clip-train`` calls :func:`preflight` right after parsing the config, so a wrong path or setting
costs seconds, not the hours of training before the first eval or checkpoint would have found it.
Each failure is one line that names the key and the value to change. The checks are the ones the
training code itself makes later (the same functions), only run first.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .config import Config, ConfigError


def preflight(cfg: Config, resume: str | None = None) -> None:
    """Raise ``ConfigError`` (or ``LaunchEnvError``) for the first problem found; cheap checks first."""
    _check_launch_env()
    _check_files(cfg)
    _check_train_data(cfg)
    _check_eval_sets(cfg)
    _check_resume(cfg, resume)
    _check_model(cfg)
    _check_objective_terms(cfg)
    _check_precision(cfg)


@contextlib.contextmanager
def _reported_as(prefix: str, *errors: type[Exception]):
    """Re-raise ``errors`` as a ``ConfigError`` whose message starts with the key and value."""
    try:
        yield
    except errors as err:
        raise ConfigError(f"{prefix}: {err}") from None


def _check_launch_env() -> None:
    from .engine.distributed import detect_env
    from .engine.ds_setup import check_launch_env

    check_launch_env(detect_env())


def _check_files(cfg: Config) -> None:
    """Files named by the config (``ds.config_file``'s existence is a ``Config.validate`` rule)."""
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained: weights file not found: {cfg.model.pretrained} "
                          f"(a local .safetensors/.pt file; nothing is downloaded)")
    if cfg.ds.config_file:
        path = Path(cfg.ds.config_file)
        try:
            if not isinstance(json.loads(path.read_text()), dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise ConfigError(f"ds.config_file {path}: not a DeepSpeed JSON config ({err})") from None


def _check_train_data(cfg: Config) -> None:
    from .data.shards import DataError, expand_weighted_shards, first_unsized, unsized_error

    with _reported_as(f"data.train={cfg.data.train!r}", DataError):
        urls, _ = expand_weighted_shards(cfg.data.train, cfg.data.train_weights)
        unsized = None if cfg.data.train_num_samples else first_unsized(urls)
        if unsized is not None:  # an epoch's length is needed before anything heavy is set up
            raise unsized_error(unsized)


def _check_eval_sets(cfg: Config) -> None:
    from .eval.datasets import resolve_classification_set, resolve_retrieval_set
    from .eval.loading import EvalError

    for key, resolve in (("zeroshot", resolve_classification_set), ("retrieval", resolve_retrieval_set)):
        path = getattr(cfg.eval, key)
        if path:
            with _reported_as(f"eval.{key}={path!r}", EvalError):
                resolve(path)
    if cfg.eval.suite:
        from .eval.suite import plan_training_suite

        with _reported_as(f"eval.suite={cfg.eval.suite!r}", EvalError):
            plan_training_suite(cfg.eval.suite)


def _check_resume(cfg: Config, resume: str | None) -> None:
    if not resume:
        return
    from .engine.checkpoint import CheckpointError, ranks_saved, resolve_checkpoint
    from .engine.distributed import detect_env

    with _reported_as(f"--resume {resume}", CheckpointError):
        path = resolve_checkpoint(Path(cfg.output_dir), resume)
    # Each rank's data position and random state are in the checkpoint: another world size would
    # change the contrastive batch (world size x batch) and lose them.
    saved_ranks, world_size = ranks_saved(path), detect_env().world_size
    if saved_ranks and saved_ranks != world_size:
        raise ConfigError(f"--resume {resume}: {path} was written by {saved_ranks} rank(s) (contrastive batch "
                          f"{saved_ranks} x {cfg.data.batch_size} x {cfg.train.accum_steps}), this launch has "
                          f"{world_size}: exact resume needs the same world size x batch")


def _check_model(cfg: Config) -> None:
    from .models.builder import ModelError, resolve_model_config

    with _reported_as(f"model.name={cfg.model.name!r}", ModelError):
        resolve_model_config(cfg.model.name)


def _check_objective_terms(cfg: Config) -> None:
    from .losses.objective import check_term_names

    check_term_names(cfg.objective.terms)


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
