"""Resumable checkpoints: ``RUN/checkpoints/step_XXXXXXXX/{state.pt,model.json}``, written atomically.

A checkpoint directory is first written under a temporary name and renamed into place once complete,
so a run killed while saving never leaves a directory named ``step_*`` that is partial. ``state.pt``
holds only tensors and plain Python values and is loaded with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read."""


class RunDirError(ValueError):
    """The output directory already holds a run and neither resume nor overwrite was asked for."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy(), np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict, model_info: dict, keep: int) -> Path:
    """Write ``state`` (+ the model/preprocess config as JSON) and prune to the ``keep`` newest."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    torch.save(state, tmp / "state.pt")
    (tmp / "model.json").write_text(json.dumps(model_info, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``latest`` or a checkpoint directory path."""
    if which == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"no checkpoint to resume in {Path(run_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(which)
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"not a checkpoint directory (no state.pt): {which}")
    return path


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """Return ``(state, model_info)``; never unpickles arbitrary objects."""
    try:
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
        model_info = json.loads((Path(path) / "model.json").read_text())
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    return state, model_info
