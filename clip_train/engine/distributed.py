"""Launch-environment detection and process-group setup (torchrun, the deepspeed launcher, SLURM, none)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_env(environ=os.environ) -> DistEnv:
    """Read ranks from the launcher's variables: torchrun and deepspeed set RANK/WORLD_SIZE/LOCAL_RANK, srun SLURM_*."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "deepspeed" if "DEEPSPEED_ENV_PATH" in environ or "CROSS_RANK" in environ else "torchrun"
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), launcher)
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                       int(environ.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv()


def pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device(requested)


def init_process_group(env: DistEnv, device: torch.device, timeout_s: int = 600) -> None:
    """gloo on CPU, NCCL on GPU; a finite timeout so a dead rank ends the job instead of hanging it."""
    if not env.distributed or dist.is_initialized():
        return
    if env.launcher == "slurm":
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("SLURM launch without MASTER_ADDR: export MASTER_ADDR and MASTER_PORT in the sbatch script")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
