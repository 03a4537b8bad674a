"""What a new user sees: no DeepSpeed warnings or config dump unless --verbose, short step lines, the
samples an epoch leaves out said once, and an image manifest without audio or ECG options."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prep_fixtures import jpeg_bytes, run_cli, write_pair
from project_paths import DEMO_CONFIG


def train_output(demo, run_dir, *extra) -> str:
    cmd = [sys.executable, "-m", "clip_train.cli", "--config", DEMO_CONFIG, f"data.train={demo}/train",
           f"output_dir={run_dir}", "data.batch_size=100", "train.steps=3", "train.log_every=1", "eval.zeroshot=",
           "eval.retrieval=", "optim.warmup_steps=1", "log.progress=off", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def quiet_and_verbose(demo_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    return train_output(demo_dataset, root / "quiet"), train_output(demo_dataset, root / "verbose", "--verbose")


def test_a_run_shows_no_deepspeed_chatter_unless_verbose(quiet_and_verbose):
    quiet, verbose = quiet_and_verbose
    assert "Setting accelerator to CPU" not in quiet and "DeepSpeed config" not in quiet
    assert "Setting accelerator to CPU" in verbose and "DeepSpeed config (also in RUN/ds_config.json)" in verbose


def test_step_lines_are_short_and_say_what_an_epoch_leaves_out(quiet_and_verbose):
    quiet, _ = quiet_and_verbose
    steps = [line for line in quiet.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(len(line) <= 110 for line in steps), steps
    assert "contrastive" not in steps[0]  # one term: it is the loss, shown once
    # 1,437 demo training pairs in batches of 100: 37 left out of every epoch
    assert "37 of the epoch's 1437 samples are left out of each epoch" in quiet


def test_an_image_manifest_lists_only_image_options(tmp_path):
    write_pair(tmp_path / "in", "a.jpg", jpeg_bytes(seed=1), "a caption")
    assert run_cli("shard", tmp_path / "in", "--out", tmp_path / "out") == 0
    options = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]
    assert options["image_size"] == 256
    assert not {"sample_rate", "max_duration", "leads", "ecg_rate", "units"} & set(options)
