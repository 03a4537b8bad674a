"""What a run directory tells and holds: samples/s that counts data waits, the weights stored once
(the export links the checkpoint's file), files readable by a team under the umask, metrics that are
exact fractions."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from clip_train.cli import main as train_main
from clip_train.data import loader
from clip_train.eval.atomic import atomic_write
from clip_train.eval.metrics import classification_metrics, retrieval_metrics
from project_paths import DEMO_CONFIG

BATCH, STEPS, LOG_EVERY, DELAY_S = 32, 6, 3, 0.25


@pytest.fixture(scope="module")
def run(demo_dataset, tmp_path_factory):
    """A short run whose loader waits DELAY_S before every batch, under umask 022."""
    run_dir = tmp_path_factory.mktemp("rundir") / "run"
    collate = loader.Collate.__call__

    def slow_collate(self, samples):
        time.sleep(DELAY_S)
        return collate(self, samples)

    patch = pytest.MonkeyPatch()
    patch.setattr(loader.Collate, "__call__", slow_collate)
    old_mask = os.umask(0o022)
    try:
        assert train_main(["--config", DEMO_CONFIG, f"data.train={demo_dataset}/train", f"output_dir={run_dir}",
                           "eval.zeroshot=", "eval.retrieval=",
                           f"data.batch_size={BATCH}", "data.workers=0", f"train.steps={STEPS}",
                           f"train.log_every={LOG_EVERY}", "optim.warmup_steps=2", "checkpoint.every_steps=3",
                           "checkpoint.keep=0"]) == 0
    finally:
        os.umask(old_mask)
        patch.undo()
    return run_dir


def stored_bytes(root: Path) -> int:
    """Bytes on disk as du counts them: a file with several hard links once."""
    inodes = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            inodes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(inodes.values())


def test_samples_per_s_is_wall_clock_with_the_data_wait(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [3, 6]
    samples = BATCH * LOG_EVERY
    for record in train:
        window_s, compute_s = samples / record["samples_per_s"], samples / record["compute_samples_per_s"]
        # The window holds LOG_EVERY loader waits that the steps themselves do not.
        assert window_s - compute_s >= 0.9 * LOG_EVERY * DELAY_S, (window_s, compute_s)
        assert window_s - compute_s < LOG_EVERY * DELAY_S + 5.0  # and not much else (no side task in it)


def test_the_run_directory_stores_the_weights_once(run):
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    export_weights = run / "export" / "open_clip_model.safetensors"
    assert export_weights.stat().st_ino == (final / "weights.safetensors").stat().st_ino
    for checkpoint in (run / "checkpoints").iterdir():
        deepspeed = stored_bytes(checkpoint / "ds")
        weights = (checkpoint / "weights.safetensors").stat().st_size
        small = sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file() and p.name != "weights.safetensors")
        assert small < 100_000 and stored_bytes(checkpoint) == deepspeed + weights + small
    side_files = sum(p.stat().st_size for p in run.iterdir() if p.is_file())  # config, metrics, curves.png
    per_checkpoint = [stored_bytes(c) for c in (run / "checkpoints").iterdir()]
    assert stored_bytes(run) == sum(per_checkpoint) + side_files + (run / "export" / "open_clip_config.json").stat().st_size


def test_export_from_an_earlier_checkpoint_links_its_weights(run, tmp_path):
    earlier = run / "checkpoints" / "step_00000003"
    out = tmp_path / "export3"
    assert train_main(["export", "--run", str(run), "--checkpoint", str(earlier), "--out", str(out)]) == 0
    assert (out / "open_clip_model.safetensors").stat().st_ino == (earlier / "weights.safetensors").stat().st_ino
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    from safetensors.torch import load_file

    saved = load_file(str(earlier / "weights.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k in saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_checkpoints_and_reports_are_readable_by_others_under_umask_022(run, tmp_path):
    assert mode(run / "export") == 0o755
    assert {mode(p) for p in (run / "export").iterdir()} == {0o644}
    for path in (run / "checkpoints").rglob("*"):
        assert mode(path) & 0o044 == 0o044, path  # group and others may read
    old_mask = os.umask(0o022)
    try:
        report = atomic_write(tmp_path / "report.json", lambda f: f.write("{}"))
    finally:
        os.umask(old_mask)
    assert mode(report) == 0o644


def test_metrics_are_exact_fractions():
    targets = torch.arange(360) % 9
    logits = torch.nn.functional.one_hot(targets, 9).float()
    logits[222:] = torch.nn.functional.one_hot((targets[222:] + 1) % 9, 9).float()  # 138 wrong
    metrics = classification_metrics(logits, targets)
    assert metrics["acc1"] == 222 / 360
    recalls = [((logits.argmax(1) == targets) & (targets == c)).sum().item() / (targets == c).sum().item()
               for c in range(9)]
    assert metrics["mean_per_class_recall"] == pytest.approx(sum(recalls) / 9, abs=1e-15)

    images = torch.eye(7)
    texts = torch.cat([torch.eye(7)[:4], -torch.eye(7)[4:]])  # captions 4-6 score lowest with their own image
    result = retrieval_metrics(images, texts, torch.arange(7), recall_k_list=(1,))
    assert result["image_retrieval_recall@1"] == 4 / 7 and result["text_retrieval_recall@1"] == 4 / 7
