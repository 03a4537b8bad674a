"""`clip-eval`: zero-shot classification or retrieval of a checkpoint, written as JSON.

    clip-eval --model RUN_OR_EXPORT_DIR_OR_NAME --dataset DIR --task zeroshot_classification \
        --output results.json [--pretrained FILE] [--templates FILE] [--batch-size N] \
        [--workers N] [--device cpu]

A bad invocation exits with status 2 and one line on stderr, `clip-eval: error: ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clip_train.eval import EVAL_TASKS, EvalError, evaluate

PROG = "clip-eval"


class UsageError(Exception):
    pass


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; we want exactly one line."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description="Zero-shot evaluation with CLIP_benchmark's metric definitions.")
    parser.add_argument("--model", required=True, help="run directory, export directory, or open_clip model name")
    parser.add_argument("--dataset", required=True, help="shard directory (or image folder for classification)")
    parser.add_argument("--task", required=True, choices=EVAL_TASKS.names())
    parser.add_argument("--output", required=True, help="where to write the results JSON")
    parser.add_argument("--pretrained", default=None, help="local weights file for an open_clip model name")
    parser.add_argument("--templates", default=None, help="prompt templates file, one per line with {c}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--device", default="cpu")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.workers < 0:
        raise UsageError("--workers must be 0 or more")
    if not Path(args.dataset).exists():
        raise UsageError(f"dataset not found: {args.dataset}")


def format_metrics(result: dict) -> str:
    """One readable line: task, dataset, then name=value for each metric ('n/a' if undefined)."""
    values = " ".join(
        f"{name}={'n/a' if value is None else format(value, '.4f')}" for name, value in result["metrics"].items()
    )
    return f"{result['task']} on {result['dataset']}: {values}"


def _write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_arguments(args)
        try:
            result = evaluate(
                args.model,
                args.dataset,
                args.task,
                pretrained=args.pretrained,
                templates=args.templates,
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
            )
        except EvalError as exc:
            raise UsageError(str(exc)) from None
        _write_json(Path(args.output), result)
    except UsageError as exc:
        one_line = " ".join(str(exc).split())  # messages quoting other errors may hold newlines
        print(f"{PROG}: error: {one_line}", file=sys.stderr)
        return 2
    print(format_metrics(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
