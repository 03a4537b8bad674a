"""Load a model to evaluate: a run directory, an export directory, or an open_clip model name.

Resolution order for `model`:
1. a directory with `open_clip_config.json` -> an export in open_clip's local-dir format;
2. a directory with `export/open_clip_config.json` -> a run directory; its export is used;
3. otherwise an open_clip model name (`open_clip.list_models()`), with weights from
   `pretrained`, which must be a local file: nothing is ever downloaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

CONFIG_FILE = "open_clip_config.json"
EXPORT_SUBDIR = "export"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
LOCAL_DIR_SCHEMA = "local-dir:"

log = logging.getLogger(__name__)


class EvalError(Exception):
    """A bad evaluation request (missing file, unknown model, malformed dataset); the message is
    one line that says what is wrong."""


@dataclass
class LoadedModel:
    """A model ready for evaluation, with what it needs to read images and text."""

    model: torch.nn.Module  # in eval mode
    preprocess: Callable  # the eval (not training) image transform
    tokenizer: Callable  # list[str] -> LongTensor of token ids
    name: str  # what the model was resolved to: an export directory or an open_clip name


def _export_dir_of(path: Path) -> Path | None:
    """The export directory that `path` designates, or None when it is neither kind of directory."""
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / EXPORT_SUBDIR / CONFIG_FILE).is_file():
        return path / EXPORT_SUBDIR
    return None


def _signal_export_of(path: Path) -> Path | None:
    """An audio/ECG export (``clip_train.models.dual``'s format) that `path` or `path/export` holds."""
    from clip_train.models.dual import CONFIG_NAME as SIGNAL_CONFIG

    for candidate in (path, path / EXPORT_SUBDIR):
        if (candidate / SIGNAL_CONFIG).is_file():
            return candidate
    return None


def _load_signal_export(export_dir: Path, device: str) -> LoadedModel:
    import json

    from clip_train.data.signal_transforms import signal_transforms
    from clip_train.models.dual import load_signal_model, signal_tokenizer
    from clip_train.models.export import SIGNAL_PREPROCESS_NAME

    net, model_cfg = load_signal_model(export_dir, device=device)
    preprocess_cfg = json.loads((export_dir / SIGNAL_PREPROCESS_NAME).read_text())
    _, preprocess = signal_transforms(preprocess_cfg["modality"], preprocess_cfg, augment=False)
    net.eval()
    return LoadedModel(model=net, preprocess=preprocess, tokenizer=signal_tokenizer(model_cfg), name=str(export_dir))


def _check_has_weights(export_dir: Path) -> None:
    # open_clip only warns and returns a randomly initialised model when the folder holds no
    # weights; evaluating that by accident would report chance-level numbers as results.
    if not any(p.suffix in WEIGHT_SUFFIXES for p in export_dir.iterdir()):
        raise EvalError(f"export directory has {CONFIG_FILE} but no weights file: {export_dir}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _create(open_clip_name: str, pretrained: str | None, device: str) -> tuple[Any, Any, Any]:
    import open_clip  # imported here: it is slow to import and only the loading paths need it

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            open_clip_name, pretrained=pretrained, device=device, weights_only=True
        )
        tokenizer = open_clip.get_tokenizer(open_clip_name)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise EvalError(f"could not load model {open_clip_name!r}: {_first_line(exc)}") from None
    return model, preprocess, tokenizer


def _resolve_model_name(model: str, pretrained: str | None) -> str:
    import open_clip

    if model.startswith("hf-hub:"):
        raise EvalError("hf-hub models are not supported: no downloads; export the model to a local directory")
    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise EvalError(
            f"model {model!r} is not a run directory, an export directory, nor an open_clip model name"
        )
    if pretrained is None:
        log.warning("no --pretrained weights for %s: evaluating a randomly initialised model", name)
    elif not Path(pretrained).is_file():
        raise EvalError(f"pretrained weights file not found: {pretrained} (only local files, no downloads)")
    return name


def load_model(model: str, pretrained: str | None = None, device="cpu") -> LoadedModel:
    """Resolve `model` (run dir -> export dir -> open_clip name) and load it in eval mode."""
    device = str(device)
    model = str(model)
    if model.startswith(LOCAL_DIR_SCHEMA):
        model = model[len(LOCAL_DIR_SCHEMA):]
    path = Path(model)
    signal_dir = _signal_export_of(path)
    if signal_dir is not None:
        if pretrained is not None:
            raise EvalError("--pretrained applies to open_clip model names only; an export directory has its weights")
        return _load_signal_export(signal_dir, device)
    if path.is_dir():
        export_dir = _export_dir_of(path)
        if export_dir is None:
            raise EvalError(
                f"{path} is neither a run directory (no {EXPORT_SUBDIR}/{CONFIG_FILE}) "
                f"nor an export directory (no {CONFIG_FILE})"
            )
        if pretrained is not None:
            raise EvalError("--pretrained applies to open_clip model names only; an export directory has its weights")
        _check_has_weights(export_dir)
        name = str(export_dir)
        net, preprocess, tokenizer = _create(LOCAL_DIR_SCHEMA + name, None, device)
    elif path.exists():
        raise EvalError(f"{path} is a file; pass an open_clip model name with --pretrained {path}")
    else:
        name = _resolve_model_name(model, pretrained)
        net, preprocess, tokenizer = _create(name, pretrained, device)
    net.eval()
    return LoadedModel(model=net, preprocess=preprocess, tokenizer=tokenizer, name=name)
