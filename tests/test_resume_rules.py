"""--resume continues the run as it was configured: RUN/config.yaml is the base; a setting given again
that would break exact resume is refused in one line before any model is built; a safe one is applied."""
from __future__ import annotations

import json

import pytest

from clip_train.cli import main as train_main
from clip_train.config import load_config, to_yaml
from clip_train.engine import trainer as trainer_module
from clip_train.resume_config import is_breaking
from project_paths import DEMO_CONFIG


def saved_run(tmp_path, *overrides, ranks=1, data=None):
    """A run folder with its config.yaml and one complete (empty) checkpoint written by `ranks` ranks."""
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.json").write_text("{}")
    for rank in range(ranks):
        (checkpoint / f"rng_rank{rank}.pt").write_bytes(b"")
    cfg = load_config(DEMO_CONFIG, [f"output_dir={run_dir}", f"data.train={data or tmp_path}", "eval.zeroshot=",
                                    "eval.retrieval=", *overrides])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the resume check")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", refuse)


@pytest.mark.parametrize("override, old, new", [
    ("data.batch_size=32", "128", "32"),
    ("train.seed=7", "0", "7"),
    ("train.accum_steps=2", "1", "2"),
    ("model.name=ViT-B-32", "'demo-tiny'", "'ViT-B-32'"),
])
def test_a_breaking_change_is_one_line_before_any_model(tmp_path, capsys, no_model, override, old, new):
    run_dir = saved_run(tmp_path)
    code = train_main(["--config", DEMO_CONFIG, "--resume", "latest", f"output_dir={run_dir}",
                       f"data.train={tmp_path}", "eval.zeroshot=", "eval.retrieval=", override])
    err = capsys.readouterr().err.strip().splitlines()
    key = override.split("=")[0]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"clip-train: error: --resume: {key} is {old} in {run_dir / 'config.yaml'} but {new}")


def test_another_world_size_is_one_line_before_any_model(demo_dataset, tmp_path, capsys, no_model):
    run_dir = saved_run(tmp_path, ranks=2, data=demo_dataset / "train")
    code = train_main(["--resume", "latest", f"output_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "written by 2 rank(s)" in err[0] and "this launch has 1" in err[0]


def test_breaking_keys_are_those_that_change_the_run():
    assert all(is_breaking(k) for k in ("data.batch_size", "data.train", "model.name", "train.seed", "loss.kind"))
    assert not any(is_breaking(k) for k in ("train.log_every", "train.steps", "eval.zeroshot", "optim.lr",
                                            "checkpoint.keep", "data.workers"))


def train_args(demo, run_dir, *extra):
    return [f"data.train={demo}/train", f"output_dir={run_dir}", "data.batch_size=32", "eval.zeroshot=",
            "eval.retrieval=", "optim.warmup_steps=2", "checkpoint.every_steps=2", *extra]


def test_a_safe_change_is_applied_and_the_saved_config_is_the_base(demo_dataset, tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert train_main(["--config", DEMO_CONFIG, *train_args(demo_dataset, run_dir, "train.steps=4",
                                                             "train.log_every=2")]) == 0
    # No --config: everything else comes from the run's config.yaml (batch 32, its data, no eval).
    with caplog.at_level("INFO", logger="clip_train"):
        assert train_main(["--resume", "latest", f"output_dir={run_dir}", "train.steps=6", "train.log_every=1"]) == 0
    assert "resume: train.steps: 4 -> 6" in caplog.text and "resume: train.log_every: 2 -> 1" in caplog.text
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 5, 6]
    saved = load_config(run_dir / "config.yaml")
    assert (saved.train.steps, saved.train.log_every, saved.data.batch_size) == (6, 1, 32)


def test_the_world_size_check_reads_the_launch_as_the_trainer_does(tmp_path, monkeypatch):
    from clip_train.config import ConfigError
    from clip_train.preflight import _check_resume

    run_dir = saved_run(tmp_path, ranks=2)
    cfg = load_config(run_dir / "config.yaml")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # srun with two tasks: two ranks, like the checkpoint
    _check_resume(cfg, "latest")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="written by 2 rank"):
        _check_resume(cfg, "latest")
