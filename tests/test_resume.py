"""Exact resume: after a kill at any point (SIGKILL) or a preemption signal (SIGTERM), the steps that
follow ``--resume latest`` produce the same losses as an uninterrupted run (CPU, deterministic)."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import preloaded
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


def run(cmd, log: Path, env: dict | None = None, timeout: float = 300) -> None:
    """Run ``cmd`` (a ``clip-train`` command line) to the end in a preloaded process; fail on an error."""
    code = preloaded.wait(preloaded.start(cmd, log, env), timeout)
    assert code == 0, f"exit code {code}\n{preloaded.tail(log)}"


def start_and_interrupt(cmd, run_dir, at_step: int, sig: int) -> int:
    log = Path(run_dir).with_name(Path(run_dir).name + "-interrupted.log")
    proc = preloaded.start(cmd, log)
    deadline = time.time() + 240
    while max(losses(run_dir), default=0) < at_step:
        assert proc.is_alive(), preloaded.tail(log)
        assert time.time() < deadline, "the run never reached the step to interrupt"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    return preloaded.wait(proc, 120)


@pytest.fixture(scope="module")
def uninterrupted(demo_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    run(command(demo_dataset, run_dir), run_dir.with_name("full.log"))
    result = losses(run_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


@pytest.mark.parametrize("sig, at_step", [(signal.SIGKILL, 5), (signal.SIGTERM, 3)])
def test_resume_after_interrupt_gives_the_same_losses(demo_dataset, tmp_path, uninterrupted, sig, at_step):
    check_interrupted_run_resumes_exactly(demo_dataset, tmp_path, uninterrupted, sig, at_step)


def check_interrupted_run_resumes_exactly(demo, tmp_path, uninterrupted, sig, at_step, *extra):
    code = start_and_interrupt(command(demo, tmp_path, *extra), tmp_path, at_step, sig)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    if sig == signal.SIGTERM:
        assert code == 0  # a preempted run saves where it stopped and exits cleanly
    assert checkpoints, "no checkpoint was written before the interrupt"
    resumed_from = int(checkpoints[-1].split("_")[1])
    assert resumed_from < STEPS
    run(command(demo, tmp_path, *extra, "--resume", "latest"), tmp_path.with_name(tmp_path.name + "-resumed.log"))
    after = losses(tmp_path)
    for step in range(resumed_from + 1, STEPS + 1):
        assert after[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))


# --- resume at any point of an epoch: loader workers x GradCache x ranks -------------------------
# One uninterrupted run per cell checkpoints every few steps (all kept); each resumed run starts in a
# fresh output directory from one of those checkpoints, mid-epoch or on an epoch's last step.

CELL_SAMPLES, CELL_CHECKPOINT_EVERY = 320, 5


@pytest.fixture(scope="module")
def eight_shards(demo_dataset, tmp_path_factory):
    from cluster_fixtures import repack_shards

    return repack_shards(demo_dataset / "train", tmp_path_factory.mktemp("eight") / "train", 8, CELL_SAMPLES // 8)


def cell_command(shards, run_dir, workers, accum, world, steps, *extra):
    micro = 16 // (world * accum)  # contrastive batch 16 in every cell: an epoch is 20 steps
    return [sys.executable, "-m", "clip_train.cli", "--config", DEMO_CONFIG, f"data.train={shards}",
            f"output_dir={run_dir}", f"data.batch_size={micro}", f"data.workers={workers}", "data.shuffle_buffer=50",
            f"train.accum_steps={accum}", f"train.steps={steps}", "train.log_every=1", "train.threads=1",
            f"checkpoint.every_steps={CELL_CHECKPOINT_EVERY}", "checkpoint.keep=0", "optim.warmup_steps=3",
            "eval.zeroshot=", "eval.retrieval=", *extra]


def run_ranks(command: list[str], world: int, log_stem: Path) -> None:
    from dist_harness import free_port

    port, procs, logs = free_port(), [], []
    for rank in range(world):
        env = dict(os.environ)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        logs.append(Path(log_stem).with_name(f"{Path(log_stem).name}-rank{rank}.log"))
        procs.append(preloaded.start(command, logs[-1], env))
    codes = [preloaded.wait(p, 300) for p in procs]
    assert codes == [0] * world, "\n".join(preloaded.tail(log) for log in logs)


@pytest.mark.parametrize("workers, accum, world, resume_at", [
    (0, 4, 1, (5, 20)),   # GradCache, loader in the main process; 20: the epoch's last step
    (2, 1, 2, (20, 10)),
    (1, 4, 2, (5,)),
])
def test_resume_anywhere_in_the_epoch_gives_the_same_losses(eight_shards, tmp_path, workers, accum, world, resume_at):
    steps = 23  # into the second epoch
    full = tmp_path / "full"
    run_ranks(cell_command(eight_shards, full, workers, accum, world, steps), world, full)
    expected = losses(full)
    assert sorted(expected) == list(range(1, steps + 1))
    for at in resume_at:
        resumed = tmp_path / f"from_{at}"
        checkpoint = full / "checkpoints" / f"step_{at:08d}"
        run_ranks(cell_command(eight_shards, resumed, workers, accum, world, steps, "--resume", str(checkpoint)), world,
                  resumed)
        after = losses(resumed)
        assert sorted(after) == list(range(at + 1, steps + 1))
        assert [after[s] for s in after] == [expected[s] for s in after], f"resumed at step {at}"
