"""AdamW with weight-decay exclusions, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def exclude_from_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Gains, biases and the logit scale/bias are not decayed (as in CLIP and open_clip)."""
    return param.ndim < 2 or name.endswith(".bias") or "logit_scale" in name or "logit_bias" in name


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """``cfg`` is the ``OptimConfig``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_from_decay(name, param) else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        # torch's fused AdamW (CPU and CUDA): one kernel over a group's tensors instead of torch's
        # default per-tensor loop, and the step counters stay tensors (no host read per parameter
        # tensor, see benchmarks/host_syncs.py). The same update. DeepSpeed's ZeRO and bf16/fp16
        # wrappers hand it their fp32 master tensors, which it takes alike.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup from ~0 to ``base_lr``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
