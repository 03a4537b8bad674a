"""Signal-text dual encoder (audio or ECG + text) with open_clip's CLIP interface.

The signal side is a registered tower (``towers.TOWERS``) plus a bias-free linear projection to
``embed_dim``; the text side is open_clip's ``TextTransformer`` built from an open_clip
``text_cfg`` (its output is already projected to ``embed_dim``). The method that encodes the
signal is called ``encode_image`` on purpose: the trainer and the eval harness call
``encode_image``/``encode_text``/``forward(x, text)`` on any open_clip model, so the same code
serves every modality. ``encode_signal`` is the same method under an honest name.

A model is described by a JSON-able config::

    {"embed_dim": 256,
     "signal_cfg": {"tower": "ecg_resnet1d", ...tower keyword arguments...},
     "text_cfg": {...open_clip CLIPTextCfg fields...},
     "init_logit_scale": 2.659, "init_logit_bias": null}   # the last two optional

and saved as ``signal_clip_config.json`` + ``model.safetensors`` (these models are ours, not
open_clip architectures, so they load with :func:`load_signal_model`, not open_clip's factory).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file, save_file
from torch import nn

from .towers import build_tower

CONFIG_NAME = "signal_clip_config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CFG_KEYS = {"embed_dim", "signal_cfg", "text_cfg", "init_logit_scale", "init_logit_bias"}


class SignalTextCLIP(nn.Module):
    """``forward(signal, text) -> (signal_features, text_features, logit_scale.exp()[, logit_bias])``,
    features L2-normalised; either input may be ``None`` (its features are then ``None``).
    ``logit_scale``/``logit_bias`` have shape [1] (DeepSpeed cannot broadcast 0-dim parameters)."""

    def __init__(self, signal_cfg: dict, text_cfg: dict, embed_dim: int,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: float | None = None,
                 output_dict: bool = False):
        super().__init__()
        self.output_dict = output_dict
        self.signal = build_tower(signal_cfg, embed_dim)
        self.signal_proj = nn.Linear(self.signal.output_dim, embed_dim, bias=False)
        nn.init.normal_(self.signal_proj.weight, std=self.signal.output_dim ** -0.5)
        self.text = _build_text_tower(embed_dim, dict(text_cfg))
        self.context_length = self.text.context_length
        self.vocab_size = self.text.vocab_size
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full([1], float(init_logit_bias)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)
        if hasattr(self.signal, "set_grad_checkpointing"):
            self.signal.set_grad_checkpointing(enable)

    def encode_signal(self, signal: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.signal_proj(self.signal(signal))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's name for the non-text tower, so modality-agnostic callers work unchanged."""
        return self.encode_signal(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, signal: torch.Tensor | None = None, text: torch.Tensor | None = None):
        signal_features = self.encode_signal(signal, normalize=True) if signal is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            out = {"image_features": signal_features, "text_features": text_features,
                   "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return signal_features, text_features, self.logit_scale.exp(), self.logit_bias
        return signal_features, text_features, self.logit_scale.exp()


def build_signal_model(model_cfg: dict) -> SignalTextCLIP:
    """Build from a config dict (see the module docstring); unknown keys raise with the valid ones."""
    unknown = sorted(set(model_cfg) - MODEL_CFG_KEYS)
    missing = sorted({"embed_dim", "signal_cfg", "text_cfg"} - set(model_cfg))
    if unknown or missing:
        raise ValueError(f"signal model config: unknown keys {unknown}, missing keys {missing}; "
                         f"valid keys: {', '.join(sorted(MODEL_CFG_KEYS))}")
    cfg = copy.deepcopy(model_cfg)
    kwargs = {k: cfg[k] for k in ("init_logit_scale", "init_logit_bias") if k in cfg}
    return SignalTextCLIP(cfg["signal_cfg"], cfg["text_cfg"], int(cfg["embed_dim"]), **kwargs)


def signal_tokenizer(model_cfg: dict) -> SimpleTokenizer:
    """open_clip's BPE tokenizer (offline) with the text tower's context length."""
    return SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))


def save_signal_model(model: SignalTextCLIP, model_cfg: dict, out_dir) -> Path:
    """Write ``signal_clip_config.json`` and ``model.safetensors`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(model_cfg, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def load_signal_model(model_dir, device: str | torch.device = "cpu") -> tuple[SignalTextCLIP, dict]:
    """Rebuild the model from ``signal_clip_config.json`` and load ``model.safetensors`` strictly."""
    path = Path(model_dir)
    model_cfg = json.loads((path / CONFIG_NAME).read_text())
    model = build_signal_model(model_cfg)
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(device)), strict=True)
    return model.to(device), model_cfg
