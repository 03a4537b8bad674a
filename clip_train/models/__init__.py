"""Dual encoders: open_clip architectures (built-in names, our bundled configs, or config files),
and audio/ECG towers paired with open_clip's text tower."""
from .builder import BuiltModel, build_model, resolve_model_config
from .export import export_model, export_open_clip

__all__ = ["BuiltModel", "build_model", "resolve_model_config", "export_model", "export_open_clip"]
