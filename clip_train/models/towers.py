"""Registry of signal towers (audio, ECG) and the small protocol every tower follows.

A tower maps the raw modality tensor of a batch to features:

- audio: waveforms ``(B, samples)`` -> ``(B, output_dim)``
- ECG:   records ``(B, leads, samples)`` -> ``(B, output_dim)``

Each registry entry is a factory ``build(cfg: dict, embed_dim: int) -> nn.Module``: ``cfg`` holds
the tower's keyword arguments (the ``signal_cfg`` section of a model config without its
``"tower"`` key) and ``embed_dim`` is the joint embedding size, which a tower may ignore (the
dual encoder adds the linear projection to ``embed_dim``). The returned module has an
``output_dim`` attribute and may offer ``set_grad_checkpointing(enable)``.

Factories are registered next to their models (``audio.py``, ``ecg.py``); :func:`build_tower`
imports those modules so the registry is complete whichever module a caller imported first.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import Registry

TowerFactory = Callable[[dict, int], nn.Module]
TOWERS: Registry[TowerFactory] = Registry("tower")


class SignalTower(nn.Module):
    """Base class: ``output_dim`` and opt-in gradient checkpointing of ``self.blocks``."""

    output_dim: int
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_blocks(self, x: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def construct(cls: type, cfg: dict, tower: str):
    """``cls(**cfg)`` with an error naming the unknown keys and the valid ones."""
    params = inspect.signature(cls.__init__).parameters
    valid = sorted(name for name in params if name != "self")
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"unknown keys {unknown} for tower {tower!r}; valid keys: {', '.join(valid)}")
    return cls(**cfg)


def tower_names() -> list[str]:
    _register_all()
    return TOWERS.names()


def build_tower(signal_cfg: dict, embed_dim: int) -> nn.Module:
    """Build the tower named by ``signal_cfg["tower"]`` with the remaining keys as its arguments."""
    _register_all()
    if "tower" not in signal_cfg:
        raise ValueError(f"signal_cfg needs a 'tower' key; valid towers: {', '.join(TOWERS.names())}")
    cfg = {k: v for k, v in signal_cfg.items() if k != "tower"}
    tower = TOWERS.get(signal_cfg["tower"])(cfg, embed_dim)
    if not isinstance(getattr(tower, "output_dim", None), int):
        raise TypeError(f"tower {signal_cfg['tower']!r} did not set an integer output_dim")
    return tower


def _register_all() -> None:
    from . import audio, ecg  # noqa: F401  (importing registers their towers)
