"""Peak memory of a training step with and without GradCache (``train.accum_steps``), on the CPU.

    python benchmarks/gradcache_memory.py --model demo-tiny --micro 64 --accum 8

Three configurations, each in a fresh process running the real ``Trainer.train_step`` (fp32,
ZeRO-0, one process) on fixed random batches (no loader, so no worker processes):

* micro-batch ``b``, accum 1: contrastive batch ``b``;
* batch ``k b``, accum 1: contrastive batch ``k b`` the plain way (all activations at once);
* micro-batch ``b``, accum ``k`` (GradCache): contrastive batch ``k b``, one micro-batch's
  activations at a time.

Two measures per configuration:

* **step peak (tensors)**: the largest total of CPU tensor bytes allocated during one step and
  alive at the same time (activations, gradients, temporaries, GradCache's cached features),
  from the allocator events of ``torch.profiler`` (``profile_memory=True``: every allocation and
  free with the running total). Weights and AdamW moments exist before the step and are not in
  it. It is exact and does not depend on how malloc returns memory to the system.
* **RSS peak**: ``getrusage(RUSAGE_SELF).ru_maxrss`` after the steps minus the resident size
  right after building the trainer: what the process really took from the system, including the
  AdamW moments created at the first step and whatever the allocator keeps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak_bytes(step) -> int:
    """Peak of live bytes allocated during ``step()`` (CPU tensors), from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak = 0

    def walk(nodes):
        nonlocal peak
        for node in nodes:
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
                peak = max(peak, fields.total_allocated)
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return peak


def child(args) -> None:
    import torch

    from clip_train.config import load_config
    from clip_train.engine.trainer import Trainer

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="gradcache-memory-"))
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name={args.model}", f"data.train={args.data}/train", "data.workers=0", f"data.batch_size={args.rows}",
        f"train.accum_steps={args.accum}", "eval.zeroshot=", "eval.retrieval=", "train.log_every=1000000",
        f"train.threads={args.threads}", f"output_dir={run_dir}", "train.steps=1000",
        "data.train_num_samples=10000000", *args.overrides])  # the size only: batches here are synthetic
    trainer = Trainer(cfg, overwrite=True)
    size = trainer.built.preprocess_cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    generator = torch.Generator().manual_seed(0)

    def batch():
        text = trainer.built.tokenizer([f"a photo of the digit {i % 10}" for i in range(args.rows)])
        return {"image": torch.randn(args.rows, 3, size, size, generator=generator), "text": text, "skipped": 0}

    micro_batches = [batch() for _ in range(args.accum)]
    inputs_bytes = sum(b["image"].numel() * 4 + b["text"].numel() * 8 for b in micro_batches)
    baseline = rss_bytes()  # model, DeepSpeed engine and the input batches, before any step
    for _ in range(args.steps):
        trainer.train_step(micro_batches)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    tensors_peak = step_peak_bytes(lambda: trainer.train_step(micro_batches))
    params = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps({"rss_peak": rss_peak, "step_peak": tensors_peak, "params": params, "inputs": inputs_bytes}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "demo_data"), help="a clip-prep demo output (for the tokenizer "
                                                                          "and data checks; batches are synthetic)")
    parser.add_argument("--model", default="demo-tiny")
    parser.add_argument("--micro", type=int, default=64, help="micro-batch rows b")
    parser.add_argument("--accum", type=int, default=8, help="GradCache micro-batches k (contrastive batch k b)")
    parser.add_argument("--steps", type=int, default=2, help="steps before the RSS reading (and one more profiled)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more clip-train overrides (key=value)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not (Path(args.data) / "train" / "sizes.json").is_file():
        parser.error(f"{args.data}/train/sizes.json not found: run clip-prep demo --out {args.data}")
    b, k = args.micro, args.accum
    configs = [(f"micro-batch {b}, accum 1", b, 1, b), (f"batch {k * b}, accum 1 (no GradCache)", k * b, 1, k * b),
               (f"micro-batch {b}, accum {k} (GradCache)", b, k, k * b)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads)}
    mib = 2**20
    print(f"{args.model}, fp32, ZeRO-0, one process, {args.threads} thread(s), {args.steps}+1 steps per configuration")
    print("| configuration | contrastive batch | step peak, tensors (MiB) | RSS peak above the built trainer (MiB) |")
    print("|---|---|---|---|")
    rows = []
    for name, rows_per_micro, accum, contrastive in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", args.data, "--model", args.model,
               "--rows", str(rows_per_micro), "--accum", str(accum), "--steps", str(args.steps),
               "--threads", str(args.threads), *args.overrides]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(result)
        print(f"| {name} | {contrastive} | {result['step_peak'] / mib:.0f} | {result['rss_peak'] / mib:.0f} |", flush=True)
    ratio = rows[2]["step_peak"] / rows[0]["step_peak"]
    print(f"\nGradCache step peak / micro-batch step peak: {ratio:.2f}; "
          f"plain {k * b}-row batch / micro-batch: {rows[1]['step_peak'] / rows[0]['step_peak']:.2f} "
          f"({rows[0]['params'] / 1e6:.1f} M parameters: {rows[0]['params'] * 4 / mib:.0f} MiB of fp32 gradients in "
          f"each step peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
