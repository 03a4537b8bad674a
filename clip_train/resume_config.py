"""``--resume`` continues a run as it was configured: ``RUN/config.yaml`` is the base, and each
setting given again on the command line (in ``--config`` or as an override) is compared with it.

A change that would break exact resume (the data stream, the model, the seed, the contrastive
batch, the optimizer state's layout) is a one-line error naming the key and both values, before
any model is built; any other change (log interval, eval sets, total steps, learning rate, ...) is
applied and reported.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, parse_override, read_recipe

SAVED_CONFIG = "config.yaml"
# Settings a resumed run must share with the run it continues, or it is not the same run.
BREAKING_SECTIONS = ("model",)
BREAKING_KEYS = {"data.train", "data.batch_size", "data.train_num_samples", "data.resampled", "data.train_weights",
                 "data.shuffle_buffer", "data.augment", "data.media_key", "data.text_key", "train.seed",
                 "train.accum_steps", "loss.kind", "ds.zero_stage", "ds.precision", "objective.terms"}


def is_breaking(key: str) -> bool:
    return key in BREAKING_KEYS or key.split(".")[0] in BREAKING_SECTIONS


def field_key(dotted: list[str]) -> str:
    """A recipe or override path cut to the config field it sets (``objective.terms.dcl`` -> ``objective.terms``)."""
    sections = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
    return ".".join(dotted[:2]) if dotted[0] in sections else dotted[0]


def given_keys(config_path: str | None, overrides: list[str]) -> list[str]:
    """The config fields the command line sets, in the order given."""
    keys: list[str] = []

    def walk(tree: dict, prefix: list[str]) -> None:
        for name, value in tree.items():
            path = prefix + [str(name)]
            if isinstance(value, dict) and not prefix:
                walk(value, path)
            else:
                keys.append(field_key(path))

    if config_path is not None:
        walk(read_recipe(config_path), [])
    keys.extend(field_key(parse_override(text)[0]) for text in overrides)
    return list(dict.fromkeys(keys))


def get_field(cfg: Config, key: str) -> Any:
    node = cfg
    for name in key.split("."):
        node = getattr(node, name)
    return node


def with_field(cfg: Config, key: str, value: Any) -> Config:
    if "." not in key:
        return dataclasses.replace(cfg, **{key: value})
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def saved_config_path(output_dir: str, resume: str) -> Path:
    """The config of the run a checkpoint belongs to: ``RUN/checkpoints/step_X`` -> ``RUN/config.yaml``."""
    if resume != "latest" and (Path(resume).parent.parent / SAVED_CONFIG).is_file():
        return Path(resume).parent.parent / SAVED_CONFIG
    return Path(output_dir) / SAVED_CONFIG


def resume_config(config_path: str | None, overrides: list[str], resume: str) -> tuple[Config, list[str]]:
    """The config of a resumed run and the changes applied to it (``key: old -> new``)."""
    given = load_config(config_path, overrides)  # the command line must be valid on its own
    saved_path = saved_config_path(given.output_dir, resume)
    if not saved_path.is_file():  # no run there (preflight says so), or one of an earlier version
        return given, []
    saved = load_config(saved_path)
    # The run continues where the command line says (a checkpoint may come from another run's folder).
    resumed, changes = with_field(saved, "output_dir", given.output_dir), []
    for key in given_keys(config_path, overrides):
        old, new = get_field(saved, key), get_field(given, key)
        if old == new:
            continue
        if is_breaking(key):
            raise ConfigError(f"--resume: {key} is {old!r} in {saved_path} but {new!r} on the command line; "
                              f"exact resume needs the same {key}: drop it, or start a new run with --overwrite")
        resumed = with_field(resumed, key, new)
        changes.append(f"{key}: {old!r} -> {new!r}")
    return resumed.validate(), changes
