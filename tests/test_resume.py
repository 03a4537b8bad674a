"""Exact resume: after a kill at any point (SIGKILL) or a preemption signal (SIGTERM), the steps that
follow ``--resume latest`` produce the same losses as an uninterrupted run (CPU, deterministic)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from project_paths import DEMO_CONFIG

STEPS = 10


def command(demo, run_dir, *extra):
    # workers=1 and augmentation on: the data position and the workers' random crops must both replay.
    return [sys.executable, "-m", "clip_train.cli", "--config", DEMO_CONFIG, f"data.train={demo}/train",
            f"output_dir={run_dir}", "data.batch_size=32", "data.workers=1", f"train.steps={STEPS}",
            "checkpoint.every_steps=2", "train.log_every=1", "optim.warmup_steps=3", "eval.zeroshot=",
            "eval.retrieval=", *extra]


def losses(run_dir) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill, again after resume) keeps its last value."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def start_and_interrupt(cmd, run_dir, at_step: int, sig: int) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while max(losses(run_dir), default=0) < at_step:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached the step to interrupt"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    return proc.wait(timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(demo_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    subprocess.run(command(demo_dataset, run_dir), check=True, capture_output=True)
    result = losses(run_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


@pytest.mark.parametrize("sig, at_step", [(signal.SIGKILL, 5), (signal.SIGTERM, 3)])
def test_resume_after_interrupt_gives_the_same_losses(demo_dataset, tmp_path, uninterrupted, sig, at_step):
    check_interrupted_run_resumes_exactly(demo_dataset, tmp_path, uninterrupted, sig, at_step)


def test_resume_with_the_loader_in_the_main_process(demo_dataset, tmp_path_factory):
    # workers=0: augmentation draws from the main RNG, so the fast-forward must happen before the
    # RNG state is restored.
    run_dir = tmp_path_factory.mktemp("full0")
    subprocess.run(command(demo_dataset, run_dir, "data.workers=0"), check=True, capture_output=True)
    check_interrupted_run_resumes_exactly(demo_dataset, tmp_path_factory.mktemp("cut0"), losses(run_dir),
                                          signal.SIGKILL, 5, "data.workers=0")


def check_interrupted_run_resumes_exactly(demo, tmp_path, uninterrupted, sig, at_step, *extra):
    code = start_and_interrupt(command(demo, tmp_path, *extra), tmp_path, at_step, sig)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    if sig == signal.SIGTERM:
        assert code == 0  # a preempted run saves where it stopped and exits cleanly
    assert checkpoints, "no checkpoint was written before the interrupt"
    resumed_from = int(checkpoints[-1].split("_")[1])
    assert resumed_from < STEPS
    subprocess.run(command(demo, tmp_path, *extra, "--resume", "latest"), check=True, capture_output=True)
    after = losses(tmp_path)
    for step in range(resumed_from + 1, STEPS + 1):
        assert after[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))
