"""Dual-encoder models: open_clip architectures (built-in names, our bundled configs, or config files)."""
from .builder import BuiltModel, build_model, resolve_model_config
from .export import export_open_clip

__all__ = ["BuiltModel", "build_model", "resolve_model_config", "export_open_clip"]
