"""``clip-train``: train from a YAML recipe, or ``clip-train export`` a checkpoint in open_clip format."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config, to_yaml



def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train", description="Train a CLIP-style dual encoder.",
                                     epilog="Subcommand: clip-train export --run RUN [--checkpoint latest] [--out DIR]")
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", help="'latest' or a checkpoint directory to continue from")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that already holds a run (deletes its metrics and checkpoints)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")
    return parser


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train export",
                                     description="Write open_clip weights + config from a checkpoint.")
    parser.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory")
    parser.add_argument("--out", help="output directory (default RUN/export)")
    return parser


def run_export(args: argparse.Namespace) -> int:
    from .engine import checkpoint as ckpt
    from .models import export_model

    path = ckpt.resolve_checkpoint(Path(args.run), args.checkpoint)
    info = ckpt.read_model_info(path)
    out = export_model(ckpt.read_weights(path), info["model_cfg"], info["preprocess_cfg"],
                           args.out or Path(args.run) / "export")
    print(f"exported {path} -> {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .engine.trainer import Trainer, TrainingError

    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    try:
        results = trainer.train()
    except RuntimeError as err:
        if not trainer.env.distributed or isinstance(err, TrainingError):
            raise
        # A peer that died surfaces as a failed collective (connection reset, timeout): say so in one line.
        print(f"clip-train: error: rank {trainer.env.rank}: a collective operation failed, most likely because "
              f"another rank died (see its log); resume with --resume latest. ({str(err).splitlines()[0][:200]})",
              file=sys.stderr)
        return 1
    if results and trainer.env.is_main:
        print("final evaluation: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # open_clip logs its model-building chatter on the root logger; keep ours at INFO and the rest quieter.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clip_train").setLevel(logging.INFO)
    from .data import DataError
    from .engine.checkpoint import CheckpointError, RunDirError
    from .engine.ds_setup import LaunchEnvError
    from .engine.trainer import TrainingError
    from .models.builder import ModelError

    exporting = bool(argv) and argv[0] == "export"
    parser = _export_parser() if exporting else _train_parser()
    # Intermixed: overrides may come before or after the flags (clip-train --overwrite a=1 --resume latest b=2).
    args = parser.parse_intermixed_args(argv[1:] if exporting else argv)
    try:
        return run_export(args) if exporting else run_train(args)
    except (ConfigError, DataError, ModelError, CheckpointError, RunDirError, TrainingError, LaunchEnvError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
