"""Throughput of `clip-prep shard` against img2dataset on the same images, side by side.

    python benchmarks/prep_throughput.py [--images 3000] [--repeats 3] [--processes 2] [--threads 16]
        [--i2d-bin /tmp/i2d-venv/bin/img2dataset] [--work DIR] [--flavours file,http,local]
        [--skip-img2dataset]

img2dataset lives in a virtual environment of its own (its dependencies pin other versions than
ours), so it is run through its command-line tool:

    python3.11 -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install img2dataset==1.47.0

The script writes ``--images`` JPEGs (sides 300-1200 px, smooth colour fields with grain, so that
they compress like photographs; fixed seed) into ``--work``, and a parquet table of (url, caption)
for each input flavour:

* ``file``: ``file:///...`` URLs (img2dataset reads them with urllib, we with fsspec);
* ``http``: ``http://127.0.0.1:PORT/...`` URLs served by a threaded HTTP server this script starts
  on the loopback interface (one connection per request, HTTP/1.0, as ``http.server`` serves);
* ``local``: plain paths, read by ``clip-prep shard --path-column``. img2dataset 1.47 has no such
  input (urllib rejects each one: "unknown url type: '/path/img.jpg'"), so this row's img2dataset figure is its ``file``
  run: what an img2dataset user does with local files.

Both tools resize to ``--image-size`` with the same resize mode (``keep_ratio``, our default: the
shorter side becomes the size), re-encode JPEG at quality 95, compute the sha256 of each source,
write webdataset shards of ``--samples-per-shard`` inputs, and run ``--processes`` processes with
``--threads`` downloads in flight in each, and shrink with the same filter: area averaging
(img2dataset's default, cv2 INTER_AREA; ours ``--downscale-filter area``, PIL's BOX; pass
``--downscale-filter lanczos`` to time our default instead). Each keeps its own defaults otherwise
(img2dataset: EXIF extraction into the parquet; ours: EXIF orientation applied).
Runs alternate which tool goes first; every run starts with an empty output folder and must write
every image (counted from the shards' ``_stats.json``, which both tools write), or the script
stops. A run's time is its whole process, wall clock, start-up included, as a user sees it; the
CPU time of the run's processes (user + system) is reported beside it.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_I2D = "/tmp/i2d-venv/bin/img2dataset"
FLAVOURS = ("file", "http", "local")


def fail(message: str) -> None:
    print(f"prep_throughput: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- the data ------------------------------------------------------------------------------------

def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs, sides drawn from 300-1200 px; reused when the folder already holds this set."""
    import numpy as np
    from PIL import Image

    marker = folder / "images.json"
    spec = {"count": count, "seed": seed, "version": 1}
    names = [f"img{i:06d}.jpg" for i in range(count)]
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return [folder / name for name in names]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in names:
        width, height = (int(side) for side in rng.integers(300, 1201, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                          Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name, "JPEG", quality=90)
    marker.write_text(json.dumps(spec))
    return [folder / name for name in names]


def write_tables(work: Path, images: list[Path], port: int | None) -> dict[str, Path]:
    """One parquet per flavour: (url, caption), or (filepath, caption) for plain paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = [f"a picture of colours, number {i}" for i in range(len(images))]
    columns = {
        "file": ("url", [path.absolute().as_uri() for path in images]),
        "local": ("filepath", [str(path.absolute()) for path in images]),
    }
    if port is not None:
        columns["http"] = ("url", [f"http://127.0.0.1:{port}/{path.name}" for path in images])
    tables = {}
    for flavour, (column, values) in columns.items():
        tables[flavour] = work / f"{flavour}.parquet"
        pq.write_table(pa.table({column: values, "caption": captions}), tables[flavour])
    return tables


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would cost more than the request
        pass


def start_server(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- the two tools -------------------------------------------------------------------------------

def i2d_command(opts, table: Path, out: Path) -> list[str]:
    """img2dataset into a folder that does not exist yet. Not with --incremental_mode overwrite: on a new
    folder, img2dataset 1.47 creates it with its _tmp, then deletes both and retries the sharding forever."""
    return [opts.i2d_bin, "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
            "--image_size", str(opts.image_size), "--resize_mode", opts.resize_mode,
            "--processes_count", str(opts.processes), "--thread_count", str(opts.threads),
            "--number_sample_per_shard", str(opts.samples_per_shard), "--encode_quality", "95",
            "--timeout", "10", "--retries", "0"]


def ours_command(opts, flavour: str, table: Path, out: Path) -> list[str]:
    clip_prep = Path(sys.executable).with_name("clip-prep")
    source = ["--path-column", "filepath"] if flavour == "local" else ["--url-column", "url"]
    return [str(clip_prep), "shard", str(table), *source, "--caption-column", "caption", "--out", str(out),
            "--image-size", str(opts.image_size), "--resize-mode", opts.resize_mode, "--jpeg-quality", "95",
            "--workers", str(opts.processes), "--threads", str(opts.threads),
            "--samples-per-shard", str(opts.samples_per_shard), "--downscale-filter", opts.downscale_filter,
            "--overwrite"]


def successes(out: Path) -> int:
    """Images written, from the shards' stats (img2dataset's format; clip-prep writes the same fields)."""
    return sum(json.loads(path.read_text())["successes"] for path in out.glob("*_stats.json"))


def timed_run(command: list[str], out: Path, log: Path, expected: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the run's processes) of one run into an empty `out`."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("ab") as sink:
        result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tool = Path(command[0]).name
    if result.returncode != 0 and not aborted_after_finishing(result.returncode, out):
        fail(f"{tool} exited {result.returncode}; its output is in {log}")
    written = successes(out)
    if written != expected:
        fail(f"{tool} wrote {written} of {expected} images into {out}; see {log}")
    if result.returncode != 0:
        ABORTS.append(f"{tool} -> {out.name}")
    return wall, cpu


# Runs whose process aborted (SIGABRT, "terminate called without an active exception") after
# writing a complete output: pyarrow's threads at interpreter exit; counted, reported, not hidden.
ABORTS: list[str] = []


def aborted_after_finishing(returncode: int, out: Path) -> bool:
    return returncode in (-6, 134) and (out / "manifest.json").exists()


# --- the report ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def i2d_versions(i2d_bin: str) -> str:
    python = Path(i2d_bin).with_name("python")
    code = ("import importlib.metadata as m, platform; "
            "print(f\"img2dataset {m.version('img2dataset')}, opencv {m.version('opencv-python-headless')}, "
            "Python {platform.python_version()}\")")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return result.stdout.strip() or f"img2dataset (version unknown: {python} did not answer)"


def our_versions() -> str:
    import PIL

    from data_prep import __version__

    return f"clip-prep {__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}"


class Runs:
    """The runs of one tool on one flavour: medians of what `timed_run` measured."""

    def __init__(self, images: int, runs: list[tuple[float, float]]):
        self.rates = [images / wall for wall, _ in runs]
        self.rate = statistics.median(self.rates)
        self.cpu_ms = statistics.median(cpu for _, cpu in runs) / images * 1000

    def cell(self) -> str:
        return f"{self.rate:.1f} ({', '.join(f'{rate:.1f}' for rate in self.rates)})"


def print_table(opts, results: dict, n_cores: int) -> None:
    print(f"\n{opts.images} JPEGs (300-1200 px) -> {opts.image_size} px {opts.resize_mode} "
          f"({opts.downscale_filter} downscaling), {opts.processes} processes x {opts.threads} threads, "
          f"{opts.samples_per_shard} per shard, {opts.repeats} run(s) each, alternating\n")
    print(f"machine: {cpu_model()}, {n_cores} cores; {platform.system()} {platform.release()}")
    print(f"ours: {our_versions()}")
    if not opts.skip_img2dataset:
        print(f"img2dataset: {i2d_versions(opts.i2d_bin)}")
    print("\nimages/s: whole process, wall clock, start-up included, median (each run); per core: over the "
          "machine's cores; CPU ms/image: user + system time of the run's processes, median\n")
    print("| flavour | img2dataset images/s | ours images/s | ours / img2dataset | per core: img2dataset, ours "
          "| CPU ms/image: img2dataset, ours |")
    print("|---|---:|---:|---:|---:|---:|")
    for flavour in opts.flavours:
        ours = Runs(opts.images, results[("ours", flavour)])
        label = "local paths (img2dataset: its file:// runs)" if flavour == "local" else f"{flavour}://"
        i2d_runs = results.get(("img2dataset", "file" if flavour == "local" else flavour))
        if i2d_runs is None:
            print(f"| {label} | - | {ours.cell()} | - | -, {ours.rate / n_cores:.1f} | -, {ours.cpu_ms:.1f} |")
            continue
        i2d = Runs(opts.images, i2d_runs)
        print(f"| {label} | {i2d.cell()} | {ours.cell()} | {ours.rate / i2d.rate:.2f}x "
              f"| {i2d.rate / n_cores:.1f}, {ours.rate / n_cores:.1f} | {i2d.cpu_ms:.1f}, {ours.cpu_ms:.1f} |")
    if ABORTS:
        print(f"\n{len(ABORTS)} run(s) wrote their whole output, then aborted at exit (SIGABRT, 'terminate called "
              f"without an active exception'; timed all the same): {', '.join(ABORTS)}")


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to generate and shard")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool on each flavour")
    parser.add_argument("--processes", type=int, default=2, help="processes of each tool")
    parser.add_argument("--threads", type=int, default=16, help="downloads in flight per process")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", choices=("keep_ratio", "center_crop", "border"), default="keep_ratio")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--downscale-filter", choices=("area", "lanczos"), default="area",
                        help="our shrinking filter (area: the same computation as img2dataset's default)")
    parser.add_argument("--flavours", default=",".join(FLAVOURS), help=f"comma-separated, of {', '.join(FLAVOURS)}")
    parser.add_argument("--i2d-bin", default=DEFAULT_I2D, help="img2dataset executable (in its own venv)")
    parser.add_argument("--skip-img2dataset", action="store_true", help="run ours only (no img2dataset needed)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prep_throughput"), help="images, tables, outputs")
    opts = parser.parse_args(argv)
    opts.flavours = [name.strip() for name in opts.flavours.split(",") if name.strip()]
    unknown = sorted(set(opts.flavours) - set(FLAVOURS))
    if unknown or not opts.flavours:
        fail(f"--flavours: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(FLAVOURS)}")
    if min(opts.images, opts.repeats, opts.processes, opts.threads, opts.samples_per_shard) < 1:
        fail("--images, --repeats, --processes, --threads and --samples-per-shard must be at least 1")
    if not opts.skip_img2dataset and not os.access(opts.i2d_bin, os.X_OK):
        fail(f"no img2dataset executable at {opts.i2d_bin}; install it in a venv of its own "
             f"(python3.11 -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install img2dataset==1.47.0) "
             f"or pass --i2d-bin PATH or --skip-img2dataset")
    return opts


def plan(opts) -> list[tuple[str, str]]:
    """(tool, flavour) runs in order: each repeat alternates which tool goes first."""
    tools = ["ours"] if opts.skip_img2dataset else ["img2dataset", "ours"]
    flavours = {"img2dataset": [f for f in opts.flavours if f != "local"], "ours": opts.flavours}
    if not opts.skip_img2dataset and "local" in opts.flavours and "file" not in opts.flavours:
        flavours["img2dataset"].append("file")  # the local row compares against img2dataset's file:// runs
    runs = []
    for repeat in range(opts.repeats):
        order = tools if repeat % 2 == 0 else tools[::-1]
        for flavour in FLAVOURS:
            runs += [(tool, flavour) for tool in order if flavour in flavours[tool]]
    return runs


def main(argv=None) -> int:
    opts = parse_args(argv)
    opts.work.mkdir(parents=True, exist_ok=True)
    print(f"writing {opts.images} JPEGs into {opts.work / 'images'} ...", file=sys.stderr, flush=True)
    images = make_images(opts.work / "images", opts.images)
    server = start_server(opts.work / "images")
    try:
        tables = write_tables(opts.work, images, server.server_address[1])
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for tool, flavour in plan(opts):
            out, log = opts.work / f"out_{tool}_{flavour}", opts.work / f"{tool}_{flavour}.log"
            command = (i2d_command(opts, tables[flavour], out) if tool == "img2dataset"
                       else ours_command(opts, flavour, tables[flavour], out))
            wall, cpu = timed_run(command, out, log, opts.images)
            print(f"{tool:>11} {flavour:>5}: {wall:6.1f} s, {opts.images / wall:6.1f} images/s, CPU {cpu:6.1f} s",
                  file=sys.stderr, flush=True)
            results.setdefault((tool, flavour), []).append((wall, cpu))
    finally:
        server.shutdown()
    print_table(opts, results, cores())
    return 0


if __name__ == "__main__":
    sys.exit(main())
