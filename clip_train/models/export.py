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


def export_open_clip(state_dict: dict[str, torch.Tensor], model_cfg: dict, preprocess_cfg: dict,
                     out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``out_dir``, atomically.

    The files go to a temporary sibling directory that replaces ``out_dir`` only once both are
    written, so a crash never leaves a half-written export that looks complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    # safetensors refuses shared or non-contiguous storage; tied weights are saved as copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS_NAME))
    config = {"model_cfg": model_cfg, "preprocess_cfg": jsonable(preprocess_cfg)}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def jsonable(cfg: dict) -> dict:
    """Tuples (mean, std, size) become lists so the config round-trips through JSON unchanged."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
