"""Training engine: the Trainer (``engine.trainer``), checkpoints, distributed setup, metrics."""
