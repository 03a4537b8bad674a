"""Build an open_clip dual encoder, its transforms and tokenizer from a model name or config file.

A model is named one of three ways: an open_clip built-in name (``ViT-B-32``), a config bundled
with this package (``demo-tiny``, in ``clip_train/models/configs/``), or a path to a JSON/YAML file
holding an open_clip model config (optionally wrapped as ``{"model_cfg": ..., "preprocess_cfg": ...}``).
Weights only ever come from a local file: nothing is downloaded.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import yaml

BUNDLED_CONFIGS = Path(__file__).parent / "configs"


class ModelError(ValueError):
    """A model that cannot be built; the message says why."""


@dataclass
class BuiltModel:
    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_cfg: dict  # the model config, as exported next to the weights
    preprocess_cfg: dict
    modality: str = "image"  # image, audio or ecg: which shard member and decoder the data path uses


def _read_config_file(path: Path) -> tuple[dict, dict]:
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ModelError(f"cannot read model config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"model config {path} must hold a mapping")
    if "model_cfg" in data:
        return data["model_cfg"], data.get("preprocess_cfg", {})
    return data, {}


def resolve_model_config(name: str) -> tuple[dict, dict]:
    """Return ``(model_cfg, preprocess_overrides)`` for a built-in name, bundled name or file."""
    path = Path(name)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ModelError(f"model config file not found: {name}")
        model_cfg, preprocess = _read_config_file(path)
    elif (BUNDLED_CONFIGS / f"{name}.json").is_file():
        model_cfg, preprocess = _read_config_file(BUNDLED_CONFIGS / f"{name}.json")
    else:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            bundled = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.json"))
            raise ModelError(f"unknown model {name!r}: not an open_clip model ({len(open_clip.list_models())} known, "
                             f"e.g. ViT-B-32), not bundled ({', '.join(bundled)}), not a .json/.yaml file")
        preprocess = {}
    tower_section = "signal_cfg" if "signal_cfg" in model_cfg else "vision_cfg"
    for section in (tower_section, "text_cfg"):
        if section not in model_cfg:
            raise ModelError(f"model config for {name!r} has no {section!r}")
    return copy.deepcopy(model_cfg), dict(preprocess)


def build_model(name: str, *, pretrained: str = "", init_logit_bias: float | None = None,
                aug: bool = True) -> BuiltModel:
    """Create the model with open_clip so what we save loads back in open_clip unchanged.

    ``init_logit_bias`` adds SigLIP's learnable bias (and SigLIP's initial scale of 10).
    """
    model_cfg, preprocess_overrides = resolve_model_config(name)
    if "signal_cfg" in model_cfg:
        return build_signal_text_model(model_cfg, preprocess_overrides, pretrained=pretrained,
                                       init_logit_bias=init_logit_bias, aug=aug)
    if init_logit_bias is not None:
        model_cfg["init_logit_bias"] = init_logit_bias
        model_cfg.setdefault("init_logit_scale", math.log(10))
    if pretrained and not Path(pretrained).is_file():
        raise ModelError(f"pretrained weights not found: {pretrained} (only local files are loaded)")
    # open_clip's factory resolves every architecture kind (timm, HF text, CoCa); it only takes
    # configs by name, so ours is registered under a private name for the duration of the call.
    private_name = "_clip_train_model"
    open_clip.factory._MODEL_CONFIGS[private_name] = copy.deepcopy(model_cfg)
    root = logging.getLogger()
    previous_level = root.level
    if not pretrained:  # open_clip warns that a model without weights is random, which is the point here
        root.setLevel(logging.ERROR)
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            private_name, pretrained=pretrained or None, pretrained_text=False,
            aug_cfg=_aug_cfg(), **_preprocess_kwargs(preprocess_overrides))
        tokenizer = open_clip.get_tokenizer(private_name)
    except (RuntimeError, ValueError) as err:
        raise ModelError(f"cannot build model {name!r}: {str(err).splitlines()[0]}") from None
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(private_name, None)
        root.setLevel(previous_level)
    if not pretrained:
        _initialise_caption_decoder(model)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    if not aug:
        train_tf = eval_tf
    return BuiltModel(model, train_tf, eval_tf, tokenizer, model_cfg, preprocess_cfg)


def build_signal_text_model(model_cfg: dict, preprocess_cfg: dict, *, pretrained: str = "",
                            init_logit_bias: float | None = None, aug: bool = True) -> BuiltModel:
    """An audio or ECG tower paired with open_clip's text tower (``clip_train.models.dual``)."""
    from ..data.signal_transforms import signal_transforms
    from .dual import build_signal_model, signal_tokenizer

    modality = preprocess_cfg.get("modality")
    if modality not in ("audio", "ecg"):
        raise ModelError("an audio/ECG model config needs preprocess_cfg.modality: audio or ecg")
    if init_logit_bias is not None:
        model_cfg["init_logit_bias"] = init_logit_bias
        model_cfg.setdefault("init_logit_scale", math.log(10))
    try:
        model = build_signal_model(model_cfg)
    except (KeyError, ValueError) as err:
        raise ModelError(str(err).splitlines()[0]) from None
    if pretrained:
        if not Path(pretrained).is_file():
            raise ModelError(f"pretrained weights not found: {pretrained} (only local files are loaded)")
        from safetensors.torch import load_file
        model.load_state_dict(load_file(pretrained), strict=True)
    train_tf, eval_tf = signal_transforms(modality, preprocess_cfg, augment=aug)
    return BuiltModel(model, train_tf, eval_tf, signal_tokenizer(model_cfg), model_cfg, preprocess_cfg, modality)


def _initialise_caption_decoder(model: torch.nn.Module) -> None:
    """open_clip 3.3's ``MultimodalTransformer`` (CoCa's text decoder) leaves its ``text_projection``
    as uninitialised memory (sometimes 1e28), and its own ``init_parameters`` cannot run (it reads
    an attribute the class lacks). Initialise the projection as that method intends; pretrained
    weights overwrite it anyway."""
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if projection is not None:
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=decoder.width ** -0.5)


def _preprocess_kwargs(overrides: dict) -> dict:
    """Map a ``preprocess_cfg`` section onto ``create_model_and_transforms``' image_* arguments."""
    known = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
             "resize_mode": "image_resize_mode"}
    unknown = set(overrides) - set(known) - {"size", "mode", "fill_color"}
    if unknown:
        raise ModelError(f"unknown preprocess_cfg keys {sorted(unknown)}; valid: {sorted(known)}")
    return {known[k]: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if k in known}


def _aug_cfg() -> dict[str, Any]:
    """Training augmentation; without it the train transform is the eval transform."""
    # A narrow crop range: small datasets (the demo's 8x8 digits) lose the label with aggressive crops.
    return {"scale": (0.8, 1.0)}
