"""Write a model in open_clip's local-dir format, loadable with ``create_model_and_transforms('local-dir:DIR')``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


SIGNAL_PREPROCESS_NAME = "preprocess_cfg.json"


def export_model(state_dict: dict[str, torch.Tensor], model_cfg: dict, preprocess_cfg: dict,
                 out_dir: str | Path) -> Path:
    """Image models in open_clip's local-dir format; audio/ECG models (which open_clip cannot
    build) as ``signal_clip_config.json`` + ``model.safetensors`` + ``preprocess_cfg.json``."""
    if "signal_cfg" not in model_cfg:
        return export_open_clip(state_dict, model_cfg, preprocess_cfg, out_dir)
    from .dual import CONFIG_NAME as SIGNAL_CONFIG, WEIGHTS_NAME as SIGNAL_WEIGHTS

    def write(tmp: Path) -> None:
        save_file(_cpu_copies(state_dict), str(tmp / SIGNAL_WEIGHTS))
        (tmp / SIGNAL_CONFIG).write_text(json.dumps(model_cfg, indent=2))
        (tmp / SIGNAL_PREPROCESS_NAME).write_text(json.dumps(jsonable(preprocess_cfg), indent=2))

    return _write_atomically(out_dir, write)


def _cpu_copies(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; tied weights are saved as copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def _write_atomically(out_dir: str | Path, write) -> Path:
    """Write into a temporary sibling directory that replaces ``out_dir`` only once complete, so a
    crash never leaves a half-written export that looks complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    write(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def export_open_clip(state_dict: dict[str, torch.Tensor], model_cfg: dict, preprocess_cfg: dict,
                     out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``out_dir``, atomically."""
    def write(tmp: Path) -> None:
        save_file(_cpu_copies(state_dict), str(tmp / WEIGHTS_NAME))
        config = {"model_cfg": model_cfg, "preprocess_cfg": jsonable(preprocess_cfg)}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    return _write_atomically(out_dir, write)


def jsonable(cfg: dict) -> dict:
    """Tuples (mean, std, size) become lists so the config round-trips through JSON unchanged."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
