"""Watching a run: TensorBoard events that TensorBoard's own reader reads back with the values of
metrics.jsonl, an offline wandb run directory, progress with an ETA, RUN/summary.json and
RUN/curves.png at the end, and `clip-train plot` over two runs."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from clip_train.cli import main as train_main
from clip_train.config import ConfigError, load_config
from project_paths import DEMO_CONFIG

STEPS = 12


def train_args(demo, run_dir, *extra):
    return ["--config", DEMO_CONFIG, f"data.train={demo}/train", f"eval.zeroshot={demo}/test", "eval.retrieval=",
            f"output_dir={run_dir}", "data.batch_size=32", f"train.steps={STEPS}", "train.log_every=1",
            "optim.warmup_steps=2", "eval.every=6", "eval.batch_size=128", "checkpoint.every_steps=0", *extra]


@pytest.fixture(scope="module")
def run(demo_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    assert train_main(train_args(demo_dataset, run_dir, "log.report_to=[jsonl,tensorboard,wandb]")) == 0
    return run_dir


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_values_of_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = read_metrics(run)
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "zeroshot/acc1", "eta_s"):
        logged = [(r["step"], r[key]) for r in records if key in r]
        read_back = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read_back] == [s for s, _ in logged], key
        # TensorBoard stores float32
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for (_, a), (_, b) in zip(read_back, logged)), key
    assert [e.step for e in events.Scalars("zeroshot/acc1")] == [6, STEPS]


def test_wandb_writes_an_offline_run_directory(run):
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), sorted(p.name for p in runs[0].iterdir())


def test_summary_agrees_with_metrics_jsonl(run):
    summary = json.loads((run / "summary.json").read_text())
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "zeroshot/acc1" in r]
    assert summary["steps"] == summary["total_steps"] == STEPS == train[-1]["step"]
    assert summary["skipped_steps"] == train[-1]["skipped_steps"] == 0
    assert summary["skipped_samples"] == sum(r["skipped"] for r in train)
    assert summary["contrastive_batch"] == 32 and summary["mean_samples_per_s"] > 0
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    assert summary["final_train"]["loss"] == train[-1]["loss"]
    assert summary["final_eval"]["zeroshot/acc1"] == evals[-1]["zeroshot/acc1"]
    best = max(evals, key=lambda r: r["zeroshot/acc1"])  # max() keeps the first of equal values
    assert summary["best_eval"]["zeroshot/acc1"] == {"value": best["zeroshot/acc1"], "step": best["step"]}


def test_curves_png_is_an_image(run):
    with Image.open(run / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 800


def test_eta_counts_down_to_zero(run):
    train = [r for r in read_metrics(run) if "loss" in r]
    etas = [r["eta_s"] for r in train]
    assert etas[-1] == 0
    # the moving average may move a little between steps; the countdown must not go back up by much
    # once it averages a few steps (with one or two, one slow step on a loaded machine doubles it)
    steady = etas[2:]
    assert all(later <= earlier * 1.5 + 0.5 for earlier, later in zip(steady, steady[1:])), etas
    elapsed = [r["elapsed_s"] for r in train]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # at the middle step, the remaining time estimated is of the order of the time the rest took
    # (the evaluation at step 6 is not a step, so it is not in the estimate)
    middle = train[len(train) // 2]
    remaining = train[-1]["elapsed_s"] - middle["elapsed_s"]
    assert remaining / 4 <= middle["eta_s"] <= remaining * 4 + 1


def test_plot_draws_two_runs_in_one_figure(run, tmp_path, capsys):
    second = tmp_path / "second"
    second.mkdir()
    (second / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "loss": r["loss"] * 0.9}) + "\n" if "loss" in r else json.dumps(r) + "\n"
        for r in read_metrics(run)))
    out = tmp_path / "both.png"
    assert train_main(["plot", str(run), str(second), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
    assert train_main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_report_to_is_checked_at_load_time(monkeypatch):
    with pytest.raises(ConfigError, match="log.report_to=.*use any of jsonl, tensorboard, wandb"):
        load_config(DEMO_CONFIG, ["log.report_to=[jsonl,mlflow]"])
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"the wandb package is not installed: pip install -e '\.\[tracking\]'"):
        load_config(DEMO_CONFIG, ["log.report_to=jsonl,wandb"])
    assert load_config(DEMO_CONFIG, ["log.report_to=jsonl,tensorboard"]).log.report_to == ["jsonl", "tensorboard"]


def test_a_bare_on_or_off_is_the_progress_setting_not_a_boolean():
    # YAML 1.1 reads `progress: off` as False
    assert load_config(DEMO_CONFIG, ["log.progress=off"]).log.progress == "off"
    assert load_config(DEMO_CONFIG, ["log.progress=on"]).log.progress == "on"
