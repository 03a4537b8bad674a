"""The curation subcommands of `clip-prep`:

    clip-prep dedup SHARDS --out DIR [--near-threshold BITS] [--samples-per-shard 10000] [--overwrite]
    clip-prep balance SHARDS --metadata FILE --t N --out DIR [--seed 0] [--samples-per-shard 10000]
        [--overwrite]

SHARDS is a clip-prep output folder; DIR becomes one too, holding the kept samples unchanged
(see data_prep/curation.py for the layout). User errors are raised as SourceError (SHARDS,
--metadata) or OutputDirError (--out), which `clip-prep` prints as one line with exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.curation import DEFAULT_SAMPLES_PER_SHARD, options_for_manifest


def _int_at_least(low: int, high: int | None = None):
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


def _common_options(parser) -> None:
    parser.add_argument("shards", type=Path, metavar="SHARDS", help="a clip-prep output folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the kept samples")
    parser.add_argument("--samples-per-shard", type=_int_at_least(1), default=DEFAULT_SAMPLES_PER_SHARD,
                        help="kept samples per output tar")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous clip-prep output in --out")


def add_dedup_command(commands) -> None:
    from data_prep.dedup import DEFAULT_NEAR_THRESHOLD, MAX_NEAR_THRESHOLD

    dedup = commands.add_parser("dedup", help="remove exact and near-duplicate images from clip-prep shards")
    _common_options(dedup)
    dedup.add_argument("--near-threshold", type=_int_at_least(0, MAX_NEAR_THRESHOLD), default=DEFAULT_NEAR_THRESHOLD,
                       metavar="BITS", help="largest Hamming distance of 64-bit perceptual hashes that counts as a "
                                            "near duplicate (0: identical hashes only)")
    dedup.set_defaults(run=run_dedup_command)


def add_balance_command(commands) -> None:
    balance = commands.add_parser("balance", help="MetaCLIP balancing: cap each metadata entry at about t samples")
    _common_options(balance)
    balance.add_argument("--metadata", type=Path, required=True, metavar="FILE",
                         help="metadata entries, one a line (UTF-8; blank lines ignored)")
    balance.add_argument("--t", type=_int_at_least(1), required=True, metavar="N",
                         help="entries matched by more than N samples keep about N of them")
    balance.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the sampling")
    balance.set_defaults(run=run_balance_command)


def run_dedup_command(args: argparse.Namespace) -> int:
    from data_prep.dedup import run_dedup

    run_dedup(args.shards, args.out, args.near_threshold, args.samples_per_shard, args.overwrite,
              options_for_manifest(vars(args)))
    return 0


def run_balance_command(args: argparse.Namespace) -> int:
    from data_prep.balance import run_balance

    run_balance(args.shards, args.out, args.metadata, args.t, args.seed, args.samples_per_shard, args.overwrite,
                options_for_manifest(vars(args)))
    return 0
