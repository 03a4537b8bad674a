"""Resume cost at 10 % and at 90 % of an epoch: time to the first trained step and samples decoded.

    python benchmarks/resume_skip.py [--samples 20000] [--batch 128] [--workers 1]

Writes a shard set of ``--samples`` noise images (32 px PNG) with captions, trains ``demo-tiny`` to 90 %
of one epoch with a checkpoint near 10 % and near 90 %, then resumes from each in a fresh process
(``clip-train --resume CHECKPOINT``), stopped after its first step. Each resumed process reports:

* seconds from its start to the end of its first trained step (imports, model, DeepSpeed, loader);
* the samples its loader decoded before that step began (the resumed batch, plus what the
  workers prefetched), and how many of those lay before the resume point (must be 0);

and, beside it, what the resume used to cost: the same ``skip`` batches pulled through the whole
pipeline (decode, augment, tokenise), as ``epoch_batches`` did before skipping became raw.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def write_shards(root: Path, samples: int, per_shard: int = 1000) -> Path:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True)
    rng, sizes = np.random.default_rng(0), {}
    for start in range(0, samples, per_shard):
        name = f"{start // per_shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for index in range(start, min(start + per_shard, samples)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                writer.write({"__key__": f"s{index:07d}", "png": buf.getvalue(), "txt": f"a photo of item {index}"})
        sizes[name] = min(per_shard, samples - start)
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root


def train_args(shards: Path, run: Path, batch: int, workers: int, steps: int, every: int) -> list[str]:
    return ["--config", str(DEMO_CONFIG), f"data.train={shards}", f"output_dir={run}", f"data.batch_size={batch}",
            f"data.workers={workers}", f"train.steps={steps}", "train.log_every=1000", "train.threads=2",
            f"checkpoint.every_steps={every}", "checkpoint.keep=0", "eval.zeroshot=", "eval.retrieval="]


def probe(args: list[str], report: Path) -> None:
    """In a resumed process: count decodes (shared with forked loader workers), stop after one step."""
    started = time.perf_counter()
    from clip_train import cli
    from clip_train.data import stream
    from clip_train.data.loader import SampleDecoder
    from clip_train.engine.trainer import Trainer

    decoded, before_resume = multiprocessing.Value("l", 0), multiprocessing.Value("l", 0)
    call, original_step = SampleDecoder.__call__, Trainer.train_step
    resume_point: dict[int, int] = {}

    def counting_call(self, sample):
        with decoded.get_lock():
            decoded.value += 1
        role, position = sample[stream.POSITION]
        if position <= resume_point.get(role, 0):
            with before_resume.get_lock():
                before_resume.value += 1
        return call(self, sample)

    def first_step(self, group):
        at_start = decoded.value
        result = original_step(self, group)
        report.write_text(json.dumps({"seconds": time.perf_counter() - started, "decoded": at_start,
                                      "before_resume": before_resume.value, "batch": len(group[0]["text"])}))
        sys.exit(0)

    original_resume = Trainer.resume

    def recording_resume(self, which):
        original_resume(self, which)
        resume_point.update(self.data_consumed)

    SampleDecoder.__call__, Trainer.train_step, Trainer.resume = counting_call, first_step, recording_resume
    cli.main(args)


def replay_seconds(shards: Path, batch: int, skip: int) -> float:
    """The previous resume: ``skip`` batches decoded and thrown away (loader in this process)."""
    from clip_train.config import DataConfig
    from clip_train.data import build_train_data
    from clip_train.models import build_model

    built = build_model("demo-tiny", aug=True)
    data = build_train_data(DataConfig(train=str(shards), batch_size=batch, workers=0, shuffle_buffer=2000),
                            built.train_transform, built.tokenizer, seed=0)
    started = time.perf_counter()
    batches = data.epoch_batches(0)
    for _ in range(skip):
        next(batches)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--probe", nargs=2, metavar=("REPORT", "ARGS_JSON"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.probe:
        return probe(json.loads(opts.probe[1]), Path(opts.probe[0]))
    work = Path(tempfile.mkdtemp(prefix="resume_skip_"))
    shards = write_shards(work / "shards", opts.samples)
    steps_per_epoch = opts.samples // opts.batch
    every = max(1, steps_per_epoch // 10)
    points = {"10 %": every, "90 %": every * 9}
    print(f"training {points['90 %']} of {steps_per_epoch} steps to write the checkpoints ...", flush=True)
    run = work / "run"
    subprocess.run([sys.executable, "-m", "clip_train.cli", *train_args(shards, run, opts.batch, opts.workers,
                    points["90 %"], every)], check=True, capture_output=True)
    rows = []
    for label, step in points.items():
        report, resumed = work / f"report_{step}.json", work / f"resumed_{step}"
        args = train_args(shards, resumed, opts.batch, opts.workers, points["90 %"] + 1, every)
        args += ["--resume", str(run / "checkpoints" / f"step_{step:08d}")]
        subprocess.run([sys.executable, __file__, "--probe", str(report), json.dumps(args)], check=True,
                       capture_output=True)
        result = json.loads(report.read_text())
        rows.append((label, step, result, replay_seconds(shards, opts.batch, step)))
    print(f"\n{opts.samples} samples, batch {opts.batch}, {opts.workers} loader worker(s), demo-tiny, "
          f"{steps_per_epoch} steps per epoch\n")
    print("| resume at | step | first step after (s) | decoded before it | of them before the resume point "
          "| replaying the skipped batches instead (s) |")
    print("|---|---|---|---|---|---|")
    for label, step, result, replay in rows:
        print(f"| {label} | {step} | {result['seconds']:.1f} | {result['decoded']} | {result['before_resume']} "
              f"| {replay:.1f} |")
    print(f"\ntime to first step, 90 % / 10 %: {rows[1][2]['seconds'] / rows[0][2]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
