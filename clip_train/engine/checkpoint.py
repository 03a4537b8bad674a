"""Resumable checkpoints: ``RUN/checkpoints/step_XXXXXXXX/``, written atomically by all ranks together.

Layout of one checkpoint: ``ds/`` (DeepSpeed's model, optimizer and scheduler states, ZeRO partitions
included), ``rng_rank{R}.pt`` (every rank's random state), ``weights.safetensors`` (the fp32 master
weights, gathered from DeepSpeed's optimizer in every ZeRO stage and precision) and
``model.json`` (model + preprocess config). Everything is first written under ``.partial-step_X``
and renamed into place once complete, so a run killed while saving never leaves a ``step_*``
directory that is partial. Our own files are loaded with ``weights_only=True`` or safetensors;
``ds/`` is DeepSpeed's format, read by DeepSpeed (it unpickles: resume only from runs you made).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"
COMPLETE_MARKER = "model.json"  # written last, just before the rename


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


def partial_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".partial-step_{step:08d}"


def final_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def write_rank_state(directory: Path, rank: int, data_position: dict | None = None) -> None:
    """This rank's RNG state and where its loader stands (``data_position``: see ``Trainer.resume``)."""
    torch.save({**rng_state(), "data_position": data_position}, Path(directory) / f"rng_rank{rank}.pt")


def ranks_saved(directory: Path) -> int:
    """How many ranks wrote the checkpoint: one ``rng_rank{R}.pt`` each (``write_rank_state``)."""
    return len(list(Path(directory).glob("rng_rank*.pt")))


def read_rank_state(directory: Path, rank: int) -> dict:
    return _load_weights_only(Path(directory) / f"rng_rank{rank}.pt")


def write_weights(directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """The fp32 master weights (floating tensors as fp32; integer buffers keep their type)."""
    save_file({k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state_dict.items()}, str(Path(directory) / "weights.safetensors"))


def check_shared_filesystem(run_dir: Path, rank: int, world_size: int) -> None:
    """Every rank must see the directory rank 0 writes: a checkpoint is written by all ranks into
    one directory and renamed by rank 0, so on node-local disks it would end up split across nodes.
    Collective: rank 0 writes a token, every rank reads it back, all agree; a one-line error otherwise."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    host = os.uname().nodename
    # Rank 0's probe name and content; a relative output_dir resolves on each rank as it would for a checkpoint.
    shared = [f".shared-fs-probe-{os.getpid()}", f"{host}:{os.getpid()}:{random.getrandbits(64)}"] if rank == 0 \
        else [None, None]
    dist.broadcast_object_list(shared, src=0)
    name, token = shared
    probe = Path(run_dir) / name
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    dist.barrier()
    sees = probe.is_file() and probe.read_text() == token
    seen_by = [None] * world_size
    dist.all_gather_object(seen_by, (rank, host, sees))
    dist.barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in seen_by if not ok]
    if blind:
        raise RunDirError(f"output_dir {run_dir} is not one directory shared by all ranks: {', '.join(blind[:4])} "
                          f"cannot see the files rank 0 writes there; checkpoints need a shared filesystem "
                          f"(put output_dir on one, e.g. NFS or Lustre, with the same absolute path on every node)")


def commit(run_dir: Path, step: int, model_info: dict, keep: int) -> Path:
    """Rank 0, after every rank wrote its part: mark complete, rename into place, prune old ones."""
    tmp, final = partial_dir(run_dir, step), final_dir(run_dir, step)
    (tmp / COMPLETE_MARKER).write_text(json.dumps(model_info, indent=2))
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
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``latest`` or a checkpoint directory path."""
    if which == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"no checkpoint to resume in {Path(run_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(which)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"not a complete checkpoint directory (no {COMPLETE_MARKER}): {which}")
    return path


def read_model_info(path: Path) -> dict:
    try:
        return json.loads((Path(path) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {Path(path) / COMPLETE_MARKER}: {err}") from None


def weights_file(path: Path) -> Path | None:
    """A checkpoint's ``weights.safetensors``, or None for a checkpoint without one."""
    found = Path(path) / "weights.safetensors"
    return found if found.is_file() else None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint: ``weights.safetensors``, or, for a checkpoint without it
    (ZeRO-3 runs of earlier versions), the partitions in ``ds/`` consolidated by DeepSpeed's tool."""
    path = Path(path)
    if (path / "weights.safetensors").is_file():
        return load_file(str(path / "weights.safetensors"))
    if not (path / DS_TAG).is_dir():
        raise CheckpointError(f"checkpoint {path} holds neither weights.safetensors nor a DeepSpeed state")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)


def _load_weights_only(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
