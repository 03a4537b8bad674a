"""Write a model in open_clip's local-dir format, loadable with ``create_model_and_transforms('local-dir:DIR')``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..file_modes import respect_umask

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


SIGNAL_PREPROCESS_NAME = "preprocess_cfg.json"


def export_model(state_dict: dict[str, torch.Tensor] | None, model_cfg: dict, preprocess_cfg: dict,
                 out_dir: str | Path, *, weights_file: Path | None = None) -> Path:
    """Image models in open_clip's local-dir format; audio/ECG models (which open_clip cannot
    build) as ``signal_clip_config.json`` + ``model.safetensors`` + ``preprocess_cfg.json``.

    ``weights_file``: a safetensors file that already holds these weights (a checkpoint's
    ``weights.safetensors``); the export hard-links it instead of writing the weights again, so a
    run directory stores them once (a copy where the filesystem has no hard links).
    """
    if "signal_cfg" not in model_cfg:
        return export_open_clip(state_dict, model_cfg, preprocess_cfg, out_dir, weights_file=weights_file)
    from .dual import CONFIG_NAME as SIGNAL_CONFIG, WEIGHTS_NAME as SIGNAL_WEIGHTS

    def write(tmp: Path) -> None:
        _place_weights(state_dict, weights_file, tmp / SIGNAL_WEIGHTS)
        (tmp / SIGNAL_CONFIG).write_text(json.dumps(model_cfg, indent=2))
        (tmp / SIGNAL_PREPROCESS_NAME).write_text(json.dumps(jsonable(preprocess_cfg), indent=2))

    return _write_atomically(out_dir, write)


def export_open_clip(state_dict: dict[str, torch.Tensor] | None, model_cfg: dict, preprocess_cfg: dict,
                     out_dir: str | Path, *, weights_file: Path | None = None) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``out_dir``, atomically."""
    def write(tmp: Path) -> None:
        _place_weights(state_dict, weights_file, tmp / WEIGHTS_NAME)
        config = {"model_cfg": model_cfg, "preprocess_cfg": jsonable(preprocess_cfg)}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    return _write_atomically(out_dir, write)


def _place_weights(state_dict: dict[str, torch.Tensor] | None, weights_file: Path | None, target: Path) -> None:
    if weights_file is None:
        save_file(_cpu_copies(state_dict), str(target))
        return
    try:
        os.link(weights_file, target)
    except OSError:  # no hard links here (another device, some network filesystems)
        shutil.copyfile(weights_file, target)


def _cpu_copies(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; tied weights are saved as copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def _write_atomically(out_dir: str | Path, write) -> Path:
    """Write into a temporary sibling directory that replaces ``out_dir`` only once complete, so a
    crash never leaves a half-written export that looks complete. The modes follow the umask, as
    open_clip's files do (a temporary directory alone would be private)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    write(tmp)
    respect_umask(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def jsonable(cfg: dict) -> dict:
    """Tuples (mean, std, size) become lists so the config round-trips through JSON unchanged."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
