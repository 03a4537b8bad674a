"""``clip-train``: train from a YAML recipe, ``clip-train export`` a checkpoint in open_clip format, or
``clip-train plot`` the curves of one or several runs."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config, to_yaml

log = logging.getLogger("clip_train")

def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train", description="Train a CLIP-style dual encoder.",
                                     epilog="Subcommands: clip-train export --run RUN [--checkpoint latest] [--out DIR]; "
                                            "clip-train plot RUN [RUN ...] [--out FILE]")
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", help="'latest' or a checkpoint directory to continue from")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that already holds a run (deletes its metrics and checkpoints)")
    parser.add_argument("--verbose", action="store_true",
                        help="debug messages, and DeepSpeed's own warnings and info (hidden otherwise: errors only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")
    return parser


def _set_up_logging(verbose: bool) -> None:
    # open_clip logs its model-building chatter on the root logger; keep ours at INFO and the rest quieter.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clip_train").setLevel(logging.DEBUG if verbose else logging.INFO)
    # DeepSpeed logs to its own logger (at every import, a warning that the accelerator is the CPU):
    # a filter, because DeepSpeed sets that logger's level itself when it is imported.
    _DEEPSPEED_FILTER.verbose = verbose
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_FILTER)  # once: a logger keeps one copy of a filter


class _DeepSpeedFilter(logging.Filter):
    verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.ERROR


_DEEPSPEED_FILTER = _DeepSpeedFilter()


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train export",
                                     description="Write open_clip weights + config from a checkpoint.")
    parser.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory")
    parser.add_argument("--out", help="output directory (default RUN/export)")
    return parser


def _plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train plot",
                                     description="Draw loss, learning rate, logit scale and eval curves of runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default: RUN/curves.png for one run, curves.png for several)")
    return parser


def run_plot(args: argparse.Namespace) -> int:
    runs = [Path(run) for run in args.runs]
    missing = [str(run) for run in runs if not (run / "metrics.jsonl").is_file()]
    if missing:
        raise ConfigError(f"no metrics.jsonl in {', '.join(missing)}: give run directories of clip-train")
    from .plotting import plot_runs

    out = Path(args.out) if args.out else (runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    print(f"wrote {plot_runs(runs, out)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .engine import checkpoint as ckpt
    from .models import export_model

    path = ckpt.resolve_checkpoint(Path(args.run), args.checkpoint)
    info = ckpt.read_model_info(path)
    linked = ckpt.weights_file(path)  # hard-linked when the checkpoint has it, consolidated otherwise
    out = export_model(None if linked else ckpt.read_weights(path), info["model_cfg"], info["preprocess_cfg"],
                       args.out or Path(args.run) / "export", weights_file=linked)
    print(f"exported {path} -> {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = _resolved_config(args)  # parse and validate before any heavy import
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .preflight import preflight

    preflight(cfg, args.resume)  # every path and setting, before a model is built
    from .engine.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    try:
        results = trainer.train()
    except Exception as err:  # noqa: BLE001 - reported in one line below, the traceback goes to the log
        return _report_failure(err, trainer)
    if results and trainer.env.is_main:
        print("final evaluation: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return 0


def _resolved_config(args: argparse.Namespace):
    """The command line's config; when resuming, the run's saved config with the safe changes applied."""
    if not args.resume:
        return load_config(args.config, args.overrides)
    from .resume_config import resume_config

    cfg, changes = resume_config(args.config, args.overrides, args.resume)
    for change in changes:
        log.info("resume: %s", change)
    return cfg


def _report_failure(err: Exception, trainer) -> int:
    """One line on stderr, the traceback in the log; a failed collective says where it happened."""
    from .engine.faults import describe_failure

    ours = isinstance(err, _one_line_errors())
    if not ours:
        log.error("rank %d: %s failed", trainer.env.rank, trainer.phase, exc_info=err)
    print(f"clip-train: error: {describe_failure(err, trainer.env.rank, trainer.phase, ours)}", file=sys.stderr)
    return 2 if ours else 1


def _one_line_errors() -> tuple[type[Exception], ...]:
    """Errors whose message already says what to change: no traceback needed."""
    from .data import DataError
    from .engine.checkpoint import CheckpointError, RunDirError
    from .engine.ds_setup import LaunchEnvError
    from .engine.trainer import TrainingError
    from .models.builder import ModelError

    return ConfigError, DataError, ModelError, CheckpointError, RunDirError, TrainingError, LaunchEnvError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("export", "plot") else "train"
    parser = {"export": _export_parser, "plot": _plot_parser, "train": _train_parser}[command]()
    # Intermixed: overrides may come before or after the flags (clip-train --overwrite a=1 --resume latest b=2).
    args = parser.parse_intermixed_args(argv if command == "train" else argv[1:])
    _set_up_logging(getattr(args, "verbose", False))
    try:
        return {"export": run_export, "plot": run_plot, "train": run_train}[command](args)
    except ConfigError as err:  # before the heavy imports: a typo is reported in about a second
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if isinstance(err, _one_line_errors()):
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
