"""Adapting open_clip models to the engine: their outputs as one tuple shape, parameters DeepSpeed accepts."""
from __future__ import annotations

import torch


def as_tuple(outputs) -> tuple:
    """open_clip's CLIP returns a tuple, CoCa a dict: both as (image, text, scale[, bias])."""
    if isinstance(outputs, dict):
        bias = (outputs["logit_bias"],) if outputs.get("logit_bias") is not None else ()
        return (outputs["image_features"], outputs["text_features"], outputs["logit_scale"], *bias)
    return tuple(outputs)


def with_vector_logit_params(built):
    """Give the logit scale/bias shape [1] instead of [] (open_clip's ``nonscalar_logit_scale``).

    DeepSpeed broadcasts parameters as byte views, which fails for 0-dim tensors; the exported
    config records the shape so the weights load back in open_clip unchanged.
    """
    model = built.model
    reshaped = False
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if param is not None and param.ndim == 0:
            setattr(model, name, torch.nn.Parameter(param.detach().reshape(1)))
            reshaped = True
    if reshaped:  # an open_clip model; audio/ECG models have shape-[1] parameters already
        built.model_cfg["nonscalar_logit_scale"] = True
    return model
