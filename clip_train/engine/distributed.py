"""Launch-environment detection and process-group setup (torchrun, the deepspeed launcher, SLURM, none)."""
from __future__ import annotations

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


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (ranks must take the same branch)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
    return flag
