"""ECG towers over ``(B, leads, samples)`` records (MERL / MELP style: 12 leads x 5,000 samples at 500 Hz).

Both towers start with per-lead normalisation (zero mean, unit std per lead per record), so their
output does not depend on each lead's gain or offset; filling NaN/inf from neighbours is the data
pipeline's job. ``ResNet1d`` is a 1-D ResNet-18/34 (BasicBlocks, stride-2 stages) with attention
pooling (MERL) or average pooling; ``ViT1d`` embeds non-overlapping time patches with all leads as
channels (Conv1d), adds a CLS token and learnable positions, and runs transformer blocks.

Augmentations are pure functions of a record (any leading shape, time on the last axis) and a
``torch.Generator``; amplitudes are relative to each lead's std so they mean the same for records
in mV or in ADC units.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .towers import TOWERS, SignalTower, construct


def normalize_leads(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit (population) std along time for every lead of every record (in >= float32)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


# ---------------------------------------------------------------- augmentations


def _uniform(shape, low: float, high: float, generator, like: torch.Tensor) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (u * (high - low) + low).to(dtype=like.dtype, device=like.device)


def _lead_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=-1, keepdim=True, unbiased=False)


def amplitude_scale(x: torch.Tensor, scale_range=(0.8, 1.2), generator: torch.Generator | None = None,
                    per_lead: bool = True) -> torch.Tensor:
    """Multiply each lead (or each record) by a factor drawn uniformly in ``scale_range``.

    Note: the towers' per-lead normalisation undoes a positive per-lead scale; this matters for
    towers built with ``normalize=False`` or when combined with additive augmentations.
    """
    shape = x.shape[:-1] + (1,) if per_lead else x.shape[:-2] + (1, 1)
    return x * _uniform(shape, scale_range[0], scale_range[1], generator, x)


def baseline_wander(x: torch.Tensor, sample_rate: float = 500.0, amplitude: float = 0.1,
                    freq_range=(0.05, 0.5), generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a low-frequency sinusoid per lead: frequency uniform in ``freq_range`` Hz, random phase,
    amplitude uniform in ``[0, amplitude]`` times the lead's std (breathing / electrode drift)."""
    shape = x.shape[:-1] + (1,)
    freq = _uniform(shape, freq_range[0], freq_range[1], generator, x)
    phase = _uniform(shape, 0.0, 2 * math.pi, generator, x)
    amp = _uniform(shape, 0.0, amplitude, generator, x) * _lead_std(x)
    t = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device) / sample_rate
    return x + amp * torch.sin(2 * math.pi * freq * t + phase)


def gaussian_noise(x: torch.Tensor, std: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add white noise with standard deviation ``std`` times each lead's std."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
    return x + noise * std * _lead_std(x)


def random_lead_dropout(x: torch.Tensor, p: float = 0.1, generator: torch.Generator | None = None,
                        return_mask: bool = False):
    """Zero each lead with probability ``p``, never all leads of a record.

    Returns the new record, and with ``return_mask`` also the boolean ``(..., leads)`` mask of
    zeroed leads.
    """
    u = torch.rand(x.shape[:-1], generator=generator, dtype=torch.float64)
    # The lead with the largest draw is the last one to drop; keeping it only changes anything
    # when every lead would be dropped.
    dropped = (u < p) & (u < u.amax(dim=-1, keepdim=True))
    out = x.masked_fill(dropped.to(x.device).unsqueeze(-1), 0.0)
    return (out, dropped) if return_mask else out


# ---------------------------------------------------------------- ResNet1d


class BasicBlock1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class AttentionPool1d(nn.Module):
    """One query (the mean token plus a learned vector) attends over all time steps, as CLIP's
    ResNet attention pool but without positional embeddings, so any length works."""

    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, out_dim)
        tokens = x.transpose(1, 2)
        query = tokens.mean(dim=1, keepdim=True) + self.query
        keys = torch.cat([query, tokens], dim=1)
        out, _ = self.attn(query, keys, keys, need_weights=False)
        return self.proj(out[:, 0])


class ResNet1d(SignalTower):
    """1-D ResNet: stem (conv stride 2 + max-pool), stages of BasicBlocks (stride 2 from the second
    stage), then attention or average pooling to ``width``. ``blocks=(2,2,2,2)`` is ResNet-18,
    ``(3,4,6,3)`` ResNet-34. 5,000 samples reach the pool as 157 steps."""

    def __init__(self, leads: int = 12, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), kernel_size: int = 7,
                 stem_kernel: int = 15, width: int = 512, pool: str = "attention", pool_heads: int = 8,
                 normalize: bool = True, eps: float = 1e-6):
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"widths {widths} and blocks {blocks} must have the same length")
        self.normalize, self.eps, self.output_dim = normalize, eps, width
        self.stem = nn.Sequential(
            nn.Conv1d(leads, widths[0], stem_kernel, 2, stem_kernel // 2, bias=False),
            nn.BatchNorm1d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool1d(3, 2, 1))
        layers, c_in = [], widths[0]
        for stage, (c_out, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                layers.append(BasicBlock1d(c_in, c_out, 2 if (stage > 0 and i == 0) else 1, kernel_size))
                c_in = c_out
        self.blocks = nn.ModuleList(layers)
        if pool == "attention":
            self.pool = AttentionPool1d(c_in, pool_heads, width)
        elif pool == "avg":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c_in, width))
        else:
            raise ValueError(f"pool must be 'attention' or 'avg', not {pool!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = normalize_leads(x, self.eps)
        x = self.stem(x.to(self.stem[0].weight.dtype))
        return self.pool(self.run_blocks(x, self.blocks))


# ---------------------------------------------------------------- ViT1d


class ViT1d(SignalTower):
    """1-D ViT: Conv1d patch embedding (all leads as channels; a trailing partial patch is
    dropped), CLS token, learnable positions for ``max_len`` samples (cropped for shorter records,
    linearly interpolated for longer), pre-norm transformer blocks, CLS or mean pooling."""

    def __init__(self, leads: int = 12, patch_size: int = 50, width: int = 256, depth: int = 6, heads: int = 4,
                 mlp_ratio: float = 4.0, max_len: int = 5000, pool: str = "cls", normalize: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {pool!r}")
        self.normalize, self.eps, self.pool, self.output_dim = normalize, eps, pool, width
        self.patch_embed = nn.Conv1d(leads, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, width, max(1, max_len // patch_size)) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def _positions(self, n: int) -> torch.Tensor:
        pos = self.pos_embed
        return pos[..., :n] if n <= pos.shape[-1] else F.interpolate(pos, size=n, mode="linear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = normalize_leads(x, self.eps)
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype))  # (B, width, patches)
        x = (x + self._positions(x.shape[-1]).to(x.dtype)).transpose(1, 2)
        cls = (self.cls_token + self.cls_pos).to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.norm(self.run_blocks(torch.cat([cls, x], dim=1), self.blocks))
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)


@TOWERS.register("ecg_resnet1d")
def build_ecg_resnet1d(cfg: dict, embed_dim: int) -> ResNet1d:
    return construct(ResNet1d, cfg, "ecg_resnet1d")


@TOWERS.register("ecg_vit1d")
def build_ecg_vit1d(cfg: dict, embed_dim: int) -> ViT1d:
    return construct(ViT1d, cfg, "ecg_vit1d")
