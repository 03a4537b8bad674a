"""Multi-node launch for clip-train: a hostfile or SLURM allocation becomes a deepspeed/torchrun command."""
from .hostfile import LaunchError

__all__ = ["LaunchError"]
