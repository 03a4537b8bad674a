"""Training throughput of ``clip-train`` against open_clip's own trainer (``open_clip_train.main``).

    python benchmarks/trainer_throughput.py --data demo_data --models demo-tiny ViT-B-32

Both trainers run, one after the other, on the same webdataset shards (``clip-prep demo --out
DIR``: DIR/train with its sizes.json), with the same model (random init, no pretrained weights),
per-process batch, loader workers, fp32, intra-op thread count (``OMP_NUM_THREADS`` and
``torch.set_num_threads``), AdamW (lr, betas, eps, weight decay with the same exclusions), warmup,
gradient clipping at norm 1.0, and the same random-resized-crop range (0.8, 1.0). Our softmax loss
runs as one tile of the whole batch (``loss.tile_size`` = batch), as open_clip's ``ClipLoss``
builds the whole logit matrix.

Throughput is measured from outside, the same way for both: each trainer logs every step (ours:
``train.log_every=1``, a line per step on stdout as in ``RUN/metrics.jsonl``; open_clip:
``--log-every-n-steps 1``), every line is time-stamped as it arrives, and steady-state samples/s is
(steps between the line of step ``--warmup`` and the last step) x batch / the seconds between those
lines. That includes waiting for the loader, the optimizer step and the per-step logging on both
sides, and excludes start-up, the first ``--warmup`` steps and the final save. Each trainer's own
report is printed next to it: ours ``samples_per_s`` (metrics.jsonl: wall clock over the logging
window, data wait included), open_clip's ``Batch (t)`` (data wait included); the medians over the
same steps.

Repetitions alternate the order (ours first, then open_clip first, ...). On a shared machine
other processes take CPU time: ``--quiet`` waits (up to ``--max-wait`` s) before each run until
the other processes use less than that many cores, and each run prints what they used.

``--mode resampled`` (default) samples shards with replacement on both sides (one long epoch);
``--mode epochs`` runs plain epochs over the shards (1,437 demo samples: 11 steps of 128 per epoch),
so the loader starts a new pass every epoch on both sides (both keep their worker processes).

open_clip 3.3's webdataset pipeline predates webdataset 1.0's end-of-shard marker (an empty dict
that its ``group_by_keys_nothrow`` cannot read, ``KeyError: 'fname'``): the open_clip side runs
with ``tar_file_expander(eof_value=None)``, webdataset 0.2's behaviour, and is otherwise unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "clip_train" / "models" / "configs"
DEFAULT_BATCH = {"demo-tiny": 128, "ViT-B-32": 32}
DEFAULT_STEPS = {"demo-tiny": (80, 20), "ViT-B-32": (24, 8)}  # (steps, warmup)
# The demo recipe's optimizer (configs/demo.yaml) with our defaults for the rest, passed to both.
LR, WD, WARMUP, BETA1, BETA2, EPS, CLIP = 2e-3, 0.1, 30, 0.9, 0.98, 1e-6, 1.0
OUR_LINE = re.compile(r"^step (\d+)/\d+  epoch (?P<epoch>\d+) .*?  (?P<own>[0-9.]+) samples/s")
OC_LINE = re.compile(r"Train Epoch: (?P<epoch>\d+) \[\s*(\d+)/(\d+).*Batch \(t\): (?P<batch_s>[0-9.]+)")


def open_clip_child(argv: list[str]) -> None:
    """Run ``open_clip_train.main`` in this process: ``MODEL_CONFIG_JSON|- ARGS...``."""
    import functools

    import open_clip
    import open_clip_train.data as oc_data
    import webdataset.tariterators as wds_tar

    oc_data.tar_file_expander = functools.partial(wds_tar.tar_file_expander, eof_value=None)
    if argv[0] != "-":
        open_clip.add_model_config(argv[0])  # registered under the file's stem (demo-tiny)
    from open_clip_train.main import main

    main(argv[1:])


def missing_open_clip_train() -> str | None:
    """A one-line instruction when open_clip's trainer or its data dependencies are missing."""
    import importlib.util

    missing = [m for m in ("open_clip_train", "pandas", "braceexpand", "fsspec") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    if "open_clip_train" in missing:
        return ("open_clip_train is not installed: .venv/bin/pip install 'open_clip_torch>=3.0' pandas fsspec "
                "(not the [training] extra: it pins webdataset<=0.2.86, which clip-train does not use)")
    return f"open_clip_train needs {', '.join(missing)}: .venv/bin/pip install {' '.join(missing)}"


def other_cpu_use(seconds: float = 2.0) -> float:
    """Cores busy over ``seconds`` (from /proc/stat), while this script itself sleeps."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def wait_until_quiet(limit: float, max_wait: float) -> float:
    deadline = time.monotonic() + max_wait
    while True:
        used = other_cpu_use()
        if used <= limit or time.monotonic() >= deadline:
            return used


def run_timed(cmd: list[str], env: dict, cwd: Path, pattern: re.Pattern, log_path: Path):
    """Run ``cmd``; return [(arrival time, match)] for each line matching ``pattern``, and the return code."""
    stamps = []
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc, log_path.open("w") as log:
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            match = pattern.search(line)
            if match:
                stamps.append((now, match))
        proc.wait()
    return stamps, proc.returncode


def steady_rate(times: list[float], batch: int, warmup: int) -> float:
    """Samples/s between the line of step ``warmup`` and the last line (one line per step)."""
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} step lines, need more than --warmup={warmup}")
    return (len(times) - warmup) * batch / (times[-1] - times[warmup - 1])


def ours_command(args, model: str, batch: int, steps: int, run_dir: Path) -> list[str]:
    overrides = [f"model.name={model}", f"data.train={Path(args.data).resolve() / 'train'}", f"data.batch_size={batch}",
                 f"data.workers={args.workers}", f"data.resampled={str(args.mode == 'resampled').lower()}",
                 f"train.steps={steps}", "train.log_every=1", f"train.threads={args.threads}", "train.seed=0",
                 f"loss.tile_size={batch}", f"optim.lr={LR}", f"optim.weight_decay={WD}", f"optim.warmup_steps={WARMUP}",
                 f"optim.beta1={BETA1}", f"optim.beta2={BETA2}", f"optim.eps={EPS}", f"optim.grad_clip={CLIP}",
                 "ds.precision=fp32", "ds.zero_stage=0", "train.device=cpu", "eval.zeroshot=", "eval.retrieval=",
                 "checkpoint.every_steps=0", f"output_dir={run_dir}"]
    if args.mode == "resampled":
        overrides.append(f"data.train_num_samples={steps * batch}")
    return [sys.executable, "-m", "clip_train.cli", "--config", str(ROOT / "configs" / "demo.yaml"), "--overwrite",
            *overrides, *args.ours_extra]


def open_clip_command(args, model: str, batch: int, steps: int, run_name: str) -> list[str]:
    shards = sorted((Path(args.data).resolve() / "train").glob("*.tar"))
    sizes = json.loads((Path(args.data) / "train" / "sizes.json").read_text())
    stems = [p.stem for p in shards]
    pattern = str(shards[0].parent / f"{{{stems[0]}..{stems[-1]}}}.tar") if len(stems) > 1 else str(shards[0])
    if args.mode == "resampled":
        data = ["--dataset-resampled", "--train-num-samples", str(steps * batch), "--epochs", "1"]
    else:
        per_epoch = sum(sizes.values()) // batch
        data = ["--train-num-samples", str(sum(sizes.values())), "--epochs", str(-(-steps // per_epoch))]
    config = str(BUNDLED / f"{model}.json") if (BUNDLED / f"{model}.json").is_file() else "-"
    return [sys.executable, str(Path(__file__).resolve()), "--open-clip-child", config,
            "--model", model, "--train-data", pattern, "--dataset-type", "webdataset", *data,
            "--batch-size", str(batch), "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu",
            "--lr", str(LR), "--wd", str(WD), "--warmup", str(WARMUP), "--beta1", str(BETA1), "--beta2", str(BETA2),
            "--eps", str(EPS), "--grad-clip-norm", str(CLIP), "--aug-cfg", "scale=(0.8,1.0)", "--seed", "0",
            "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", "none", "--name", run_name,
            "--report-to", "", *args.open_clip_extra]


def run_side(side: str, args, model: str, batch: int, steps: int, warmup: int, work: Path, rep: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))
    tag = f"{side}-{model}-{rep}"
    background = wait_until_quiet(args.quiet, args.max_wait) if args.quiet is not None else other_cpu_use(1.0)
    cwd = work / tag
    cwd.mkdir(parents=True, exist_ok=True)
    if side == "ours":
        cmd, pattern = ours_command(args, model, batch, steps, cwd / "run"), OUR_LINE
    else:
        cmd, pattern = open_clip_command(args, model, batch, steps, tag), OC_LINE
    started = time.perf_counter()
    stamps, code = run_timed(cmd, env, cwd, pattern, work / f"{tag}.log")
    if code != 0:
        raise SystemExit(f"{side} exited with {code}: see {work / f'{tag}.log'}")
    times = [t for t, _ in stamps]
    if side == "ours":
        own = [float(m["own"]) for _, m in stamps[warmup:]]
    else:
        own = [batch / float(m["batch_s"]) for _, m in stamps[warmup:] if float(m["batch_s"]) > 0]
    return {"side": side, "rep": rep, "samples_per_s": steady_rate(times, batch, warmup), "own": statistics.median(own),
            "epoch_boundary_s": epoch_boundary_cost(times, [int(m["epoch"]) for _, m in stamps]),
            "steps": len(times), "wall_s": time.perf_counter() - started, "background_cores": background}


def epoch_boundary_cost(times: list[float], epochs: list[int]) -> float | None:
    """Median extra seconds of the first step of an epoch over an ordinary step (line-to-line gaps):
    what starting an epoch's loader costs. None without an epoch change (resampled mode)."""
    gaps = [(b - a, e1 != e0) for a, b, e0, e1 in zip(times, times[1:], epochs, epochs[1:])]
    boundary, ordinary = [g for g, new in gaps if new], [g for g, new in gaps if not new]
    if not boundary or not ordinary:
        return None
    return statistics.median(boundary) - statistics.median(ordinary)


def boundary_note(result: dict) -> str:
    cost = result["epoch_boundary_s"]
    return "" if cost is None else f"; epoch boundary +{cost:.2f} s"


def print_epoch_boundaries(args, results: list[dict]) -> None:
    print()
    print("| model | ours epoch boundary, s | open_clip epoch boundary, s |")
    print("|---|---:|---:|")
    for model in args.models:
        cost = {side: [r["epoch_boundary_s"] for r in results if r["model"] == model and r["side"] == side
                       and r["epoch_boundary_s"] is not None] for side in args.sides}
        cells = [f"{statistics.median(cost[s]):.2f}" if cost.get(s) else "-" for s in ("ours", "open_clip")]
        print(f"| {model} | {cells[0]} | {cells[1]} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--open-clip-child":
        open_clip_child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a clip-prep demo output directory (its train/ shards)")
    parser.add_argument("--models", nargs="+", default=["demo-tiny"], help="demo-tiny (bundled) and/or open_clip names")
    parser.add_argument("--batch", type=int, help="per-process batch (default: 128 for demo-tiny, 32 for ViT-B-32)")
    parser.add_argument("--steps", type=int, help="steps per run (default: 80 demo-tiny, 24 ViT-B-32)")
    parser.add_argument("--warmup", type=int, help="steps not counted (default: 20 demo-tiny, 8 ViT-B-32)")
    parser.add_argument("--reps", type=int, default=3, help="runs per trainer and model, alternating the order")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads on both sides")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes on both sides")
    parser.add_argument("--mode", choices=["resampled", "epochs"], default="resampled")
    parser.add_argument("--sides", nargs="+", choices=["ours", "open_clip"], default=["ours", "open_clip"])
    parser.add_argument("--quiet", type=float, help="before each run, wait until other processes use at most this "
                                                    "many cores (e.g. 0.3)")
    parser.add_argument("--max-wait", type=float, default=120, help="longest wait for --quiet, seconds")
    parser.add_argument("--work", help="keep the runs and their logs here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--ours-extra", nargs="*", default=[], help="more clip-train overrides (key=value)")
    parser.add_argument("--open-clip-extra", nargs="*", default=[], help="more open_clip_train.main arguments")
    args = parser.parse_args()
    if not (Path(args.data) / "train" / "sizes.json").is_file():
        parser.error(f"{args.data}/train/sizes.json not found: run clip-prep demo --out {args.data}")
    if "open_clip" in args.sides and (problem := missing_open_clip_train()):
        print(problem)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="trainer-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPU(s), {args.threads} thread(s), {args.workers} loader worker(s), fp32, mode {args.mode}; "
          f"logs in {work}", flush=True)
    results = []
    for model in args.models:
        batch = args.batch or DEFAULT_BATCH.get(model, 32)
        steps = args.steps or DEFAULT_STEPS.get(model, (24, 8))[0]
        warmup = args.warmup or DEFAULT_STEPS.get(model, (24, 8))[1]
        for rep in range(args.reps):
            for side in (args.sides if rep % 2 == 0 else args.sides[::-1]):
                r = run_side(side, args, model, batch, steps, warmup, work, rep)
                r.update(model=model, batch=batch)
                results.append(r)
                print(f"  {model} batch {batch} {side:9s} rep {rep}: {r['samples_per_s']:7.1f} samples/s "
                      f"(own report {r['own']:.1f}; other processes used {r['background_cores']:.2f} cores before it; "
                      f"{r['wall_s']:.0f} s{boundary_note(r)})", flush=True)
    print()
    print(f"| model | batch | steps (warmup) | ours samples/s | open_clip samples/s | ours / open_clip |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        batch = rows[0]["batch"]
        steps = args.steps or DEFAULT_STEPS.get(model, (24, 8))[0]
        warmup = args.warmup or DEFAULT_STEPS.get(model, (24, 8))[1]
        med = {side: statistics.median(r["samples_per_s"] for r in rows if r["side"] == side) for side in args.sides}
        reps = {side: ", ".join(f"{r['samples_per_s']:.1f}" for r in rows if r["side"] == side) for side in args.sides}
        ratio = f"{med['ours'] / med['open_clip']:.2f}x" if len(med) == 2 else "-"
        print(f"| {model} | {batch} | {steps} ({warmup}) | {med.get('ours', float('nan')):.1f} ({reps.get('ours', '')}) "
              f"| {med.get('open_clip', float('nan')):.1f} ({reps.get('open_clip', '')}) | {ratio} |")
    if args.mode == "epochs":
        print_epoch_boundaries(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
