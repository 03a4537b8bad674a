"""`clip-prep`: shard local (image, caption) pairs, or write the embedded demo dataset.

    clip-prep shard INPUT --out DIR [--modality image] [--path-column filepath]
        [--caption-column caption] [--image-size 256]
        [--resize-mode keep_ratio|center_crop|border] [--samples-per-shard 10000]
        [--workers N] [--max-pixels N] [--jpeg-quality 95] [--overwrite]
    clip-prep demo --out DIR [--image-size 32] [--seed 0] [--overwrite]

A bad invocation prints one line, `clip-prep: error: ...`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from data_prep import __version__
from data_prep.images import DEFAULT_MAX_PIXELS, RESIZE_MODES  # importing it registers "image"
from data_prep.pipeline import run_pipeline
from data_prep.samples import MODALITIES
from data_prep.sources import SourceError, SourceSpec, open_source
from data_prep.writer import DatasetWriter, InvariantError, OutputDirError, prepare_output_dir

USAGE_ERROR = 2
INTERNAL_ERROR = 1


class UsageError(ValueError):
    """A bad command line; shown as one line instead of argparse's usage dump."""


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise UsageError(message)


def _bounded_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_shard_command(commands) -> None:
    shard = commands.add_parser("shard", help="write webdataset shards from a folder, CSV/TSV or JSONL")
    shard.add_argument("input", type=Path, metavar="INPUT", help="folder with STEM.txt captions, or .csv/.tsv/.jsonl")
    shard.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest")
    shard.add_argument("--modality", default="image", help=f"kind of media (valid: {', '.join(MODALITIES.names())})")
    shard.add_argument("--path-column", default="filepath", help="table/JSONL column holding media paths")
    shard.add_argument("--caption-column", default="caption", help="table/JSONL column holding captions")
    shard.add_argument("--image-size", type=_bounded_int(1, 16384), default=256, help="target size in pixels")
    shard.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio",
                       help="keep_ratio: smaller side = size; center_crop: square crop; border: pad to a white square")
    shard.add_argument("--samples-per-shard", type=_bounded_int(1), default=10000, help="samples per tar")
    shard.add_argument("--workers", type=_bounded_int(1), default=default_workers(), help="decode processes")
    shard.add_argument("--max-pixels", type=_bounded_int(1), default=DEFAULT_MAX_PIXELS,
                       help="reject images with more pixels than this (checked from the header)")
    shard.add_argument("--jpeg-quality", type=_bounded_int(1, 100), default=95, help="JPEG quality of outputs")
    shard.add_argument("--overwrite", action="store_true", help="replace a previous clip-prep output in --out")
    shard.set_defaults(run=run_shard)


def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="write the embedded handwritten-digits demo dataset")
    demo.add_argument("--out", type=Path, required=True, help="output folder (train/, test/, retrieval/)")
    demo.add_argument("--image-size", type=_bounded_int(8, 1024), default=32, help="image side in pixels")
    demo.add_argument("--seed", type=_bounded_int(0), default=0, help="seed for the split and the captions")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    demo.set_defaults(run=run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="clip-prep", description="Turn local media + captions into webdataset shards.")
    parser.add_argument("--version", action="version", version=f"clip-prep {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{shard,demo}")
    add_shard_command(commands)
    add_demo_command(commands)
    return parser


def _options_for_manifest(args: argparse.Namespace) -> dict:
    return {name: str(value) if isinstance(value, Path) else value
            for name, value in vars(args).items() if name != "run"}


def run_shard(args: argparse.Namespace) -> int:
    try:
        modality = MODALITIES.get(args.modality)
    except KeyError as error:
        raise UsageError(f"--modality: {error.args[0]}") from None
    if args.input.is_dir() and args.out.resolve() == args.input.resolve():
        raise UsageError("--out must not be the INPUT folder itself")
    spec = SourceSpec(args.input, args.path_column, args.caption_column, exclude=args.out)
    kind, items = open_source(spec)  # validates INPUT and columns before touching --out
    prepare_output_dir(args.out, args.overwrite)
    writer = DatasetWriter(args.out, args.samples_per_shard)
    manifest_fields = {"source_type": kind, "modality": modality.name, "options": _options_for_manifest(args)}
    summary = run_pipeline(items, modality, modality.build_options(args), writer, args.workers, manifest_fields)
    print(summary.one_line())
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from data_prep.demo import build_demo  # imports scikit-learn, only needed here

    counts = build_demo(args.out, image_size=args.image_size, seed=args.seed, overwrite=args.overwrite)
    print("clip-prep demo: " + ", ".join(f"{split} {count}" for split, count in counts.items()) + f" -> {args.out}")
    return 0


def print_error(message: str) -> None:
    """Exactly one line on stderr, whatever the message contains."""
    print("clip-prep: error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, SourceError, OutputDirError) as error:
        print_error(str(error))
        return USAGE_ERROR
    except InvariantError as error:
        print_error(f"internal check failed: {error}")
        return INTERNAL_ERROR
    except KeyboardInterrupt:
        print("clip-prep: interrupted; the output folder has no manifest.json and is incomplete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
