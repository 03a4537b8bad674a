"""Paths into the repository that several tests use (imported by them as ``project_paths``)."""
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = str(CONFIGS / "demo.yaml")
