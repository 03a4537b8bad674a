"""`clip-prep`: shard local (image|audio|ECG, caption) pairs, write a demo dataset, or convert a
benchmark into CLIP_benchmark's webdataset layout.

    clip-prep shard INPUT --out DIR [--modality image|audio|ecg] [--path-column filepath]
        [--caption-column caption] [--save-additional-columns a,b] [--samples-per-shard 10000]
        [--workers N] [--overwrite | --resume] [--min-words N] [--min-side PX] [--max-aspect R]
        [--distributor local|ray [--ray-address ADDR]]
        [--url-column url [--threads 16] [--timeout 10] [--retries 0] [--max-download-bytes N]
         [--user-agent UA] [--ignore-opt-out]]
      INPUT: a folder, a .csv/.tsv/.jsonl (each optionally .gz) or a .parquet table
      image: [--image-size 256] [--resize-mode keep_ratio|center_crop|border]
             [--max-pixels N] [--jpeg-quality 95]
      audio: [--sample-rate 48000] [--max-duration SECONDS]
      ecg:   [--leads I,II,III,aVR,aVL,aVF,V1,...,V6] [--ecg-rate 500] [--ecg-seconds 10]
             [--ecg-length-policy crop_start|crop_center] [--ecg-dtype float16|float32]
             [--lead-names NAMES --source-rate HZ [--units mV]]   (for .npy/.csv arrays)
    clip-prep demo --out DIR [--modality image|audio|ecg] [--seed 0] [--overwrite]
        [--image-size 32] [--sample-rate 16000] [--ecg-rate 500]
        [--train-per-class N] [--test-per-class N] [--workers N]
    clip-prep benchmark-set --out ROOT [--split test]
        (--from-folder DIR | --from-csv FILE | --from-karpathy JSON --images DIR [--karpathy-split test]
         | --from-shards DIR)
        [--path-column path --label-column label] [--classnames FILE] [--templates FILE]
        [--dataset-name NAME] [--samples-per-shard 1000] [--workers N] [--overwrite]
    clip-prep dedup SHARDS --out DIR [--near-threshold BITS]        (see data_prep/curation_cli.py)
    clip-prep balance SHARDS --metadata FILE --t N --out DIR [--seed S]

A bad invocation prints one line, `clip-prep: error: ...`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from data_prep import __version__
from data_prep.curation_cli import add_balance_command, add_dedup_command
from data_prep.audio import DEFAULT_SAMPLE_RATE, MAX_FLAC_SAMPLE_RATE  # importing registers "audio"
from data_prep.ecg import DEFAULT_ECG_RATE, DEFAULT_ECG_SECONDS, ECG_DTYPES, LENGTH_POLICIES, STANDARD_LEADS
from data_prep.images import DEFAULT_MAX_PIXELS, DOWNSCALE_FILTERS, RESIZE_MODES  # importing it registers "image"
from data_prep.pipeline import run_pipeline
from data_prep.samples import MODALITIES
from data_prep.sources import SourceError, SourceSpec, open_source
from data_prep.store import Store, is_url, open_store, write_json
from data_prep.samples import MissingToolError
from data_prep.writer import JOB_FILE, MANIFEST_FILE, DatasetWriter, InvariantError, OutputDirError, prepare_output_dir

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _aspect_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != 0 and not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"an aspect ratio is at least 1 (or 0: off), got {text!r}")
    return value


def _column_list(text: str) -> tuple[str, ...]:
    columns = tuple(c.strip() for c in text.split(",") if c.strip())
    if not columns:
        raise argparse.ArgumentTypeError("expected comma-separated column names")
    return columns


def _lead_list(text: str) -> tuple[str, ...]:
    """Comma-separated lead names: none empty, no duplicates (case-insensitive)."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty lead name in {text!r}")
    lowered = [name.lower() for name in names]
    duplicates = sorted({name for name in names if lowered.count(name.lower()) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"lead(s) named twice: {', '.join(duplicates)}")
    return names


def _output_location(text: str) -> Path | str:
    """--out: a folder, or an fsspec URL kept as text (s3://bucket/prefix)."""
    return text.rstrip("/") if is_url(text) else Path(text)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_shard_command(commands) -> None:
    shard = commands.add_parser("shard", help="write webdataset shards from a folder, CSV/TSV, JSONL or Parquet")
    shard.add_argument("input", type=Path, metavar="INPUT",
                       help="folder with STEM.txt captions, or .csv/.tsv/.jsonl (optionally .gz) or .parquet")
    shard.add_argument("--out", type=_output_location, required=True,
                       help="output folder for shards and manifest, or an fsspec URL (s3://bucket/prefix)")
    shard.add_argument("--modality", default="image", help=f"kind of media (valid: {', '.join(MODALITIES.names())})")
    shard.add_argument("--path-column", default="filepath", help="table/JSONL column holding media paths")
    shard.add_argument("--caption-column", default="caption", help="table/JSONL column holding captions")
    shard.add_argument("--url-column", default=None,
                       help="table column of http(s) URLs to download the media from (instead of --path-column)")
    download = shard.add_argument_group("downloads (with --url-column)")
    download.add_argument("--threads", type=_bounded_int(1), default=16, help="downloads in flight per process")
    download.add_argument("--timeout", type=_positive_float, default=10.0, help="connect and read timeout, seconds")
    download.add_argument("--retries", type=_bounded_int(0), default=0,
                          help="retries of a timeout, reset or 5xx, with exponential backoff")
    download.add_argument("--max-download-bytes", type=_bounded_int(1), default=50 * 1024 * 1024,
                          help="reject a body larger than this")
    download.add_argument("--user-agent", default=None, help="the User-Agent header sent")
    download.add_argument("--ignore-opt-out", action="store_true",
                          help="download images whose X-Robots-Tag says noai/noimageai/noindex (respected by default)")
    shard.add_argument("--save-additional-columns", type=_column_list, default=(), metavar="A,B",
                       help="table columns copied into each sample's KEY.json under their own names")
    shard.add_argument("--image-size", type=_bounded_int(1, 16384), default=256, help="target size in pixels")
    shard.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio",
                       help="keep_ratio: smaller side = size; center_crop: square crop; border: pad to a white square")
    shard.add_argument("--downscale-filter", choices=tuple(DOWNSCALE_FILTERS), default="lanczos",
                       help="shrinking filter: lanczos (sharpest) or area (averaging, as img2dataset's default "
                            "cv2.INTER_AREA; about 3x faster)")
    shard.add_argument("--samples-per-shard", type=_bounded_int(1), default=10000,
                       help="inputs per shard (img2dataset's number_sample_per_shard): a tar holds those written")
    shard.add_argument("--workers", type=_bounded_int(1), default=default_workers(),
                       help="decode processes (with --distributor ray and no --ray-address: the local cluster's CPUs)")
    shard.add_argument("--distributor", choices=("local", "ray"), default="local",
                       help="local: a process pool on this machine; ray: one Ray task per shard")
    shard.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (as ray.init(address=...) takes it); default: start a local one")
    shard.add_argument("--max-pixels", type=_bounded_int(1), default=DEFAULT_MAX_PIXELS,
                       help="reject images with more pixels than this (checked from the header)")
    shard.add_argument("--jpeg-quality", type=_bounded_int(1, 100), default=95, help="JPEG quality of outputs")
    curation = shard.add_argument_group("filters (DataComp's basic filtering; 0 turns one off)")
    curation.add_argument("--min-words", type=_bounded_int(0), default=0, help="reject captions of fewer words")
    curation.add_argument("--min-side", type=_bounded_int(0), default=0,
                          help="reject images whose shorter side is under this many pixels")
    curation.add_argument("--max-aspect", type=_aspect_ratio, default=0.0,
                          help="reject images whose longer/shorter side ratio is above this (at least 1)")
    shard.add_argument("--overwrite", action="store_true", help="replace a previous clip-prep output in --out")
    shard.add_argument("--resume", action="store_true",
                       help="continue the unfinished job in --out (run with the same INPUT and options)")
    add_audio_options(shard, default_rate=DEFAULT_SAMPLE_RATE)
    audio = shard.add_argument_group("audio")
    audio.add_argument("--max-duration", type=_positive_float, default=None,
                       help="keep only the first SECONDS of longer clips (recorded in KEY.json)")
    add_ecg_options(shard)
    shard.set_defaults(run=run_shard)


def add_audio_options(parser, default_rate) -> None:
    parser.add_argument("--sample-rate", type=_bounded_int(1, MAX_FLAC_SAMPLE_RATE), default=default_rate,
                        help="audio: output rate in Hz, mono (FLAC allows up to 655350)")


def add_ecg_options(parser) -> None:
    ecg = parser.add_argument_group("ecg")
    ecg.add_argument("--leads", type=_lead_list, default=STANDARD_LEADS,
                     help="output leads, in order (default the standard 12); matched case-insensitively")
    ecg.add_argument("--ecg-rate", type=_bounded_int(1, 100_000), default=DEFAULT_ECG_RATE, help="output rate in Hz")
    ecg.add_argument("--ecg-seconds", type=_positive_float, default=DEFAULT_ECG_SECONDS, help="output length in seconds")
    ecg.add_argument("--ecg-length-policy", choices=LENGTH_POLICIES, default="crop_start",
                     help="how longer records are cut (shorter ones are zero-padded at the end)")
    ecg.add_argument("--ecg-dtype", choices=ECG_DTYPES, default="float16", help="dtype of KEY.npy")
    ecg.add_argument("--lead-names", type=_lead_list, default=None,
                     help="names of the leads of .npy/.csv arrays (the axis of this length is the lead axis)")
    ecg.add_argument("--source-rate", type=_positive_float, default=None, help="sampling rate of .npy/.csv arrays in Hz")
    ecg.add_argument("--units", default="mV", help="units of .npy/.csv arrays (WFDB headers carry their own)")


def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="write a demo dataset (digits images, spoken digits, simulated ECGs)")
    demo.add_argument("--out", type=Path, required=True, help="output folder (train/, test/, retrieval/)")
    demo.add_argument("--modality", choices=("image", "audio", "ecg"), default="image",
                      help="image: sklearn digits; audio: espeak-ng spoken digits; ecg: neurokit2 simulations")
    demo.add_argument("--image-size", type=_bounded_int(8, 1024), default=32, help="image: side in pixels")
    add_audio_options(demo, default_rate=None)
    demo.add_argument("--ecg-rate", type=_bounded_int(50, 2000), default=DEFAULT_ECG_RATE, help="ecg: rate in Hz")
    demo.add_argument("--train-per-class", type=_bounded_int(1), default=None,
                      help="audio/ecg: training samples per class (default: the full demo)")
    demo.add_argument("--test-per-class", type=_bounded_int(1), default=None,
                      help="audio/ecg: held-out samples per class (default: the full demo)")
    demo.add_argument("--workers", type=_bounded_int(1), default=default_workers(), help="audio/ecg: processes")
    demo.add_argument("--seed", type=_bounded_int(0), default=0, help="seed for the split and the captions")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    demo.set_defaults(run=run_demo)


def _split_name(text: str) -> str:
    """A split is one folder name under ROOT (test, train, ...), never a path."""
    if text in ("", ".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"expected a folder name such as 'test', got {text!r}")
    return text


def add_benchmark_set_command(commands) -> None:
    bench = commands.add_parser("benchmark-set", help="convert a benchmark into CLIP_benchmark's webdataset layout")
    bench.add_argument("--out", type=Path, required=True, help="dataset ROOT: ROOT/SPLIT/N.tar, classnames.txt, ...")
    bench.add_argument("--split", type=_split_name, default="test", help="split folder to write under ROOT")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", type=Path, metavar="DIR", help="one sub-folder per class (as ImageFolder)")
    source.add_argument("--from-csv", type=Path, metavar="FILE", help="CSV of (image path, class index or name)")
    source.add_argument("--from-karpathy", type=Path, metavar="JSON", help="MSCOCO/Flickr30k Karpathy caption JSON")
    source.add_argument("--from-shards", type=Path, metavar="DIR",
                        help="clip-prep shards: classification (with classnames.txt) or retrieval captions")
    bench.add_argument("--images", type=Path, metavar="DIR", help="--from-karpathy: folder of the images")
    bench.add_argument("--karpathy-split", default=None, help="--from-karpathy: split to keep (default test)")
    bench.add_argument("--path-column", default=None, help="--from-csv: column of image paths (default path)")
    bench.add_argument("--label-column", default=None, help="--from-csv: column of labels (default label)")
    bench.add_argument("--classnames", type=Path, metavar="FILE", help="class names, one a line, in index order")
    bench.add_argument("--templates", type=Path, metavar="FILE", help="zero-shot prompts, one a line, each with {c}")
    bench.add_argument("--dataset-name", default=None, help="take class names and templates of a known benchmark")
    bench.add_argument("--samples-per-shard", type=_bounded_int(1), default=1000, help="samples per tar")
    bench.add_argument("--workers", type=_bounded_int(1), default=default_workers(), help="encoding processes")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing ROOT/SPLIT")
    bench.set_defaults(run=run_benchmark_set)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="clip-prep", description="Turn local media + captions into webdataset shards.")
    parser.add_argument("--version", action="version", version=f"clip-prep {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{shard,demo,benchmark-set,dedup,balance}")
    add_shard_command(commands)
    add_demo_command(commands)
    add_benchmark_set_command(commands)
    add_dedup_command(commands)
    add_balance_command(commands)
    return parser


# Options that only one modality reads: the manifest of another modality's shards leaves them out.
MODALITY_OPTIONS = {
    "image": {"image_size", "resize_mode", "downscale_filter", "max_pixels", "jpeg_quality"},
    "audio": {"sample_rate", "max_duration"},
    "ecg": {"leads", "ecg_rate", "ecg_seconds", "ecg_length_policy", "ecg_dtype", "lead_names", "source_rate", "units"},
}


def _options_for_manifest(args: argparse.Namespace) -> dict:
    others = set().union(*(names for modality, names in MODALITY_OPTIONS.items() if modality != args.modality))
    return {name: str(value) if isinstance(value, Path) else value
            for name, value in vars(args).items() if name != "run" and name not in others}


def _download_options(args: argparse.Namespace):
    from data_prep.download import USER_AGENT, DownloadOptions

    return DownloadOptions(timeout=args.timeout, retries=args.retries, max_bytes=args.max_download_bytes,
                           user_agent=args.user_agent or USER_AGENT, respect_opt_out=not args.ignore_opt_out)


def run_shard(args: argparse.Namespace) -> int:
    try:
        modality = MODALITIES.get(args.modality)
    except KeyError as error:
        raise UsageError(f"--modality: {error.args[0]}") from None
    local_out = isinstance(args.out, Path)
    if args.input.is_dir() and local_out and args.out.resolve() == args.input.resolve():
        raise UsageError("--out must not be the INPUT folder itself")
    used_filters = [flag for flag, value in (("--min-words", args.min_words), ("--min-side", args.min_side),
                                             ("--max-aspect", args.max_aspect)) if value]
    if used_filters and modality.name != "image":
        raise UsageError(f"{', '.join(used_filters)}: the basic filters apply to --modality image")
    if args.input.is_dir() and args.save_additional_columns:
        raise UsageError("--save-additional-columns reads table columns; INPUT is a folder")
    if args.url_column and args.input.is_dir():
        raise UsageError("--url-column reads a table column; INPUT is a folder")
    if args.ray_address and args.distributor != "ray":
        raise UsageError("--ray-address is for --distributor ray")
    spec = SourceSpec(args.input, args.path_column, args.caption_column, exclude=args.out if local_out else None,
                      record_suffixes=modality.record_suffixes, additional_columns=args.save_additional_columns,
                      url_column=args.url_column)
    kind, items = open_source(spec)  # validates INPUT and columns before touching --out
    job = _job_record(args)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the job in --out and --overwrite replaces it: pass one of them")
    store = open_store(args.out)
    out = args.out if local_out else store
    if args.resume and MANIFEST_FILE in store.names():
        _check_same_job(store, job)
        print(f"clip-prep: {args.out} is already complete (manifest.json); nothing to do")
        return 0
    extra_columns = args.save_additional_columns or ()
    if args.resume and store.names():
        _check_same_job(store, job)
        writer = DatasetWriter.resumed(out, args.samples_per_shard, extra_columns)
        accounted = sum(stats.count for stats in writer.shards.values())
        print(f"clip-prep: resuming {args.out}: {len(writer.shards)} complete shard(s) kept, "
              f"{accounted} inputs already accounted for", file=sys.stderr)
    else:
        prepare_output_dir(out if local_out else store, args.overwrite)
        write_json(store, JOB_FILE, job)
        writer = DatasetWriter(out, args.samples_per_shard, extra_columns=extra_columns)
    manifest_fields = {"source_type": kind, "modality": modality.name, "options": _options_for_manifest(args)}
    summary = _run(args, items, modality, writer, manifest_fields)
    print(summary.one_line())
    return 0


def _run(args: argparse.Namespace, items, modality, writer: DatasetWriter, manifest_fields: dict):
    """Every input through the chosen distributor into `writer`'s folder."""
    options, threads = modality.build_options(args), args.threads if args.url_column else 1
    if args.distributor == "ray":
        from data_prep.ray_distributor import ShardJob, run_ray

        out = args.out.absolute() if isinstance(args.out, Path) else writer.store
        job = ShardJob(out, modality.encode, options, _download_options(args), writer.extra_columns,
                       threads)
        return run_ray(items, job, args.samples_per_shard, writer.shards, manifest_fields, args.ray_address,
                       args.workers)
    return run_pipeline(items, modality, options, writer, args.workers, manifest_fields, threads=threads,
                        download_options=_download_options(args))


# Options that change how fast a job runs but not what it writes: a resumed job may change them.
_SPEED_OPTIONS = ("workers", "threads", "resume", "overwrite", "out", "distributor", "ray_address")


def _job_record(args: argparse.Namespace) -> dict:
    """What decides the output of a job: its input and every option that shapes the shards."""
    options = {k: v for k, v in _options_for_manifest(args).items() if k not in _SPEED_OPTIONS}
    return {"input": str(args.input.resolve()), "options": options}


def _check_same_job(store: Store, job: dict) -> None:
    if JOB_FILE not in store.names():
        raise UsageError(f"--resume: {store} holds no {JOB_FILE}, so it is not a clip-prep shard job to continue")
    before = json.loads(store.read_bytes(JOB_FILE))
    job = json.loads(json.dumps(job))  # tuples as the lists the file holds
    if before != job:
        changed = sorted(k for k in {*before["options"], *job["options"]}
                         if before["options"].get(k) != job["options"].get(k))
        what = f"options {', '.join(changed)}" if changed else "INPUT"
        raise UsageError(f"--resume: {what} differ from the job in {store}; rerun it with the same command")


def run_demo(args: argparse.Namespace) -> int:
    if args.modality == "image":
        from data_prep.demo import build_demo  # imports scikit-learn, only needed here

        counts = build_demo(args.out, image_size=args.image_size, seed=args.seed, overwrite=args.overwrite)
    else:
        from data_prep.demo_signals import DemoSize, build_signal_demo

        size = DemoSize(args.train_per_class, args.test_per_class, args.workers)
        rate = args.sample_rate if args.modality == "audio" else args.ecg_rate
        counts = build_signal_demo(args.modality, args.out, rate, size, args.seed, args.overwrite)
    print("clip-prep demo: " + ", ".join(f"{split} {count}" for split, count in counts.items()) + f" -> {args.out}")
    return 0


def _check_benchmark_flags(args: argparse.Namespace) -> None:
    """An option that only one kind of source reads is refused with the others, not silently ignored."""
    only_for = {
        "--from-karpathy": (("--images", args.images), ("--karpathy-split", args.karpathy_split)),
        "--from-csv": (("--path-column", args.path_column), ("--label-column", args.label_column)),
    }
    given_source = {"--from-karpathy": args.from_karpathy, "--from-csv": args.from_csv}
    for source, options in only_for.items():
        for flag, value in options:
            if value is not None and given_source[source] is None:
                raise UsageError(f"{flag} is only used with {source}")
    if args.from_karpathy is not None:
        if args.images is None:
            raise UsageError("--from-karpathy needs --images DIR")
        for flag, value in (("--classnames", args.classnames), ("--templates", args.templates),
                            ("--dataset-name", args.dataset_name)):
            if value is not None:
                raise UsageError(f"{flag} is for classification sets; --from-karpathy writes a retrieval set")


def run_benchmark_set(args: argparse.Namespace) -> int:
    _check_benchmark_flags(args)
    from data_prep import benchmark_set as bench  # imports webdataset (and torch), only needed here

    meta = bench.ClassMetadata(args.classnames, args.templates, args.dataset_name, root=args.out)
    destination = bench.Destination(args.out, args.split, args.samples_per_shard, args.overwrite)
    try:
        if args.from_folder is not None:
            dataset = bench.from_folder(args.from_folder, meta, exclude=args.out)
        elif args.from_shards is not None:
            dataset = bench.from_shards(args.from_shards, meta)
        elif args.from_csv is not None:
            dataset = bench.from_csv(args.from_csv, args.path_column or "path", args.label_column or "label", meta)
        else:
            dataset = bench.from_karpathy(args.from_karpathy, args.images, args.karpathy_split or "test")
        summary = bench.write_benchmark_set(dataset, destination, args.workers)
    except bench.BenchmarkSetError as error:
        raise UsageError(str(error)) from None
    print(summary.one_line())
    return 0


def print_error(message: str) -> None:
    """Exactly one line on stderr, whatever the message contains."""
    print("clip-prep: error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, SourceError, OutputDirError, MissingToolError) as error:
        print_error(str(error))
        return USAGE_ERROR
    except InvariantError as error:
        print_error(f"internal check failed: {error}")
        return INTERNAL_ERROR
    except KeyboardInterrupt:
        print("clip-prep: interrupted; the output is incomplete (no manifest.json; for benchmark-set, no nshards.txt)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
