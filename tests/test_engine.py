"""Engine pieces: schedule, weight-decay groups, checkpoints (atomic, weights_only), launch-env detection."""
import math
import random

import numpy as np
import pytest
import torch

from clip_train.config import OptimConfig
from clip_train.engine import checkpoint as ckpt
from clip_train.engine.distributed import detect_env
from clip_train.engine.optim import build_optimizer, warmup_cosine
from clip_train.models import build_model


def test_warmup_then_cosine():
    lr = lambda s: warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)                      # decay starts at the peak
    assert lr(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_weight_decay_skips_gains_biases_and_logit_scale():
    model = build_model("demo-tiny").model
    opt = build_optimizer(model, OptimConfig(weight_decay=0.3))
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.3
    names = {id(p): n for n, p in model.named_parameters()}
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert any(names[id(p)].endswith("ln_final.weight") for p in no_decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def fake_checkpoint(run_dir, step, keep=2):
    """What every rank writes, then rank 0's commit."""
    tmp = ckpt.partial_dir(run_dir, step)
    tmp.mkdir(parents=True)
    ckpt.write_rank_state(tmp, 0)
    ckpt.write_weights(tmp, {"w": torch.full((2, 2), float(step))})
    return ckpt.commit(run_dir, step, {"model_cfg": {"step": step}}, keep=keep)


def test_rng_state_round_trips_through_weights_only_files(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.write_rank_state(tmp_path, 3)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.read_rank_state(tmp_path, 3))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_commit_renames_complete_checkpoints_and_prunes(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".partial-step_00000004").mkdir()  # a save killed half-way
    (tmp_path / "checkpoints" / "step_00000009").mkdir()            # a directory without its marker
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    latest = ckpt.resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "step_00000003" and ckpt.read_model_info(latest) == {"model_cfg": {"step": 3}}
    assert torch.equal(ckpt.read_weights(latest)["w"], torch.full((2, 2), 3.0))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "other", "latest")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step_00000009"))


def test_rank_state_refuses_pickled_objects(tmp_path):
    torch.save({"evil": object()}, tmp_path / "rng_rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.read_rank_state(tmp_path, 0)


@pytest.mark.parametrize("environ, expected", [
    ({}, (0, 1, 0, "none")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CROSS_RANK": "0"}, (1, 2, 1, "deepspeed")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1, "slurm")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1, 0, "none")),
])
def test_launch_environment_detection(environ, expected):
    env = detect_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == expected


def test_ds_config_generated_from_yaml_and_merged_with_a_raw_file(tmp_path):
    from clip_train.config import load_config
    from clip_train.engine.ds_setup import build_ds_config

    raw = tmp_path / "ds.json"
    raw.write_text('{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000}, "gradient_clipping": 0.5}')
    cfg = load_config(None, ["data.batch_size=16", "train.accum_steps=4", "ds.zero_stage=2", "ds.precision=bf16",
                             "optim.grad_clip=2.0"])
    generated = build_ds_config(cfg, world_size=8)
    assert generated["train_batch_size"] == 16 * 4 * 8 and generated["gradient_accumulation_steps"] == 4
    assert generated["zero_optimization"]["stage"] == 2 and generated["bf16"]["enabled"]
    assert not generated["fp16"]["enabled"] and generated["gradient_clipping"] == 2.0
    cfg = load_config(None, ["ds.precision=fp16", f"ds.config_file={raw}"])
    merged = build_ds_config(cfg, world_size=1)
    assert merged["zero_optimization"]["stage"] == 3                      # the raw file wins
    assert merged["zero_optimization"]["stage3_max_live_parameters"] == 1000
    assert merged["zero_optimization"]["contiguous_gradients"] is True     # generated keys it didn't name stay
    assert merged["gradient_clipping"] == 0.5 and merged["fp16"]["enabled"]


def test_ds_config_file_must_exist():
    from clip_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ds.config_file not found"):
        load_config(None, ["ds.config_file=/nonexistent.json"])


def test_slurm_launch_without_master_addr_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    from clip_train.cli import main as train_main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert train_main([f"output_dir={tmp_path}", "data.train=unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("clip-train: error: SLURM launch without MASTER_ADDR: export MASTER_ADDR and MASTER_PORT "
                   "in the sbatch script")
