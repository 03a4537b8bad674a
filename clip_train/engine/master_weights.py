"""Where DeepSpeed keeps the true weights, and the two things we do to them: clamp and read.

Under bf16/fp16, and under ZeRO-1/2/3 in any precision, the optimizer updates fp32 *master* copies
(whole or partitioned) and copies them back into the module after every step. The module's tensor
is then only a (rounded) image of the truth: clamping it is undone by the next copy-back, and
saving it saves the rounded copy. So both go to the masters:

* :func:`clamp_` applies CLIP's logit-scale clamp to every copy a rank holds: its fragment of the
  fp32 master and its part of the module tensor. Clamping is element-wise, so each rank clamps what
  it holds and no communication is needed; the result equals open_clip's single-process clamp
  exactly (the master *is* the value the next step starts from). We clamp the master rather than
  clamp inside the forward (``exp(min(s, log max))``): a forward-side clamp leaves the stored value
  free to drift past the limit under Adam's momentum, so the saved and exported scale would not be
  the one used, and open_clip's own weights would load with a scale above its limit.
* :func:`master_state_dict` returns the fp32 masters of every parameter (gathered from the
  partitions; a collective: every rank calls it) plus the module's buffers, so ``weights.safetensors``
  and the export hold the same weights as DeepSpeed's optimizer state, in every stage and precision.

The master of a parameter is found with DeepSpeed's tensor-fragment API: ZeRO-3 parameters carry
``ds_id`` (and ``ds_tensor``, this rank's partition of the module copy); ZeRO-1/2 and the bf16
optimizer attach ``_hp_mapping`` (this rank's fragment, or None when it holds none of the tensor).
fp32 at ZeRO-0 has no separate master: the module parameter is the truth. fp16 (and bf16 with our
torch optimizer) at ZeRO-0 go through DeepSpeed's FP16_Optimizer or FP16_UnfusedOptimizer, whose
fp32 copies are read through ``fp32_groups_flat`` / ``fp32_groups``.
"""
from __future__ import annotations

import torch
from torch import nn


def clamp_(param: nn.Parameter, optimizer, min_value: float, max_value: float) -> None:
    """Clamp ``param`` in place in the fp32 master and in the module copy, on this rank's share."""
    with torch.no_grad():
        for tensor in _local_copies(param, optimizer):
            tensor.clamp_(min_value, max_value)


def _local_copies(param: nn.Parameter, optimizer) -> list[torch.Tensor]:
    """Every tensor on this rank that holds (part of) ``param``: module copy and fp32 master."""
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partitions of the module copy and the master
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(param)
        copies = [param.ds_tensor] + ([master] if master is not None else [])
        if param.data.numel() == param.ds_numel:
            # A small parameter that ZeRO-3 keeps gathered between steps ("persistent", as the logit
            # scale always is): the next forward reads this full copy, gathered before our clamp.
            copies.append(param.data)
        return copies
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2 or the bf16 optimizer: a fragment of the flat fp32 partition
        return [param.data, mapping.get_hp_fragment()]
    fp16_master = _fp16_optimizer_master(param, optimizer)
    return [param.data] + ([fp16_master] if fp16_master is not None else [])


def _fp16_optimizer_master(param: nn.Parameter, optimizer) -> torch.Tensor | None:
    """ZeRO-0 under fp16, or under bf16 with a client optimizer: DeepSpeed's FP16_Optimizer keeps one
    flat fp32 tensor per group (``fp32_groups_flat``), FP16_UnfusedOptimizer one fp32 copy per
    parameter (``fp32_groups``). Return the tensor that mirrors ``param`` (None for optimizers
    that have no separate master)."""
    groups = getattr(optimizer, "fp16_groups", None)
    flats, copies = getattr(optimizer, "fp32_groups_flat", None), getattr(optimizer, "fp32_groups", None)
    if groups is None or (flats is None and copies is None):
        return None
    for i, group in enumerate(groups):
        offset = 0
        for j, p in enumerate(group):
            if p is param:
                return copies[i][j] if flats is None else flats[i].narrow(0, offset, p.numel()).view_as(p)
            offset += p.numel()
    return None


def full_master(param: nn.Parameter, optimizer) -> torch.Tensor:
    """The whole fp32 master of ``param`` (a collective under ZeRO-1/2/3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        value = safe_get_full_fp32_param(param)
        if value is not None:
            return value.detach().float().view(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
    fp16_master = _fp16_optimizer_master(param, optimizer)
    return (fp16_master if fp16_master is not None else param).detach().float()


def master_state_dict(module: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """``module.state_dict()``'s keys with the fp32 masters as values (buffers as the module holds them),
    on the CPU. Every rank must call it; the result is complete on every rank."""
    masters = {name: full_master(p, optimizer).cpu() for name, p in module.named_parameters()}
    state = {}
    for name, value in module.state_dict().items():
        tensor = masters.get(name)
        if tensor is None:  # a buffer (running statistics...): floats as fp32, counters keep their type
            tensor = value.detach().cpu()
            tensor = tensor.float() if tensor.is_floating_point() else tensor
        state[name] = tensor.clone().contiguous()
    return state
