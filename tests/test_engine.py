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


def test_checkpoint_round_trip_with_rng_and_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = {"model": model.state_dict(), "step": 7, "epoch": 1, "rng": ckpt.rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = ckpt.save_checkpoint(tmp_path, 7, state, {"model_cfg": {"a": 1}}, keep=2)
    loaded, info = ckpt.load_checkpoint(path)
    assert info == {"model_cfg": {"a": 1}} and loaded["step"] == 7
    assert torch.equal(loaded["model"]["weight"], model.weight)
    ckpt.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_ignores_partial_writes_and_prunes(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, {}, keep=2)
    (tmp_path / "checkpoints" / ".partial-xyz").mkdir()          # a save killed half-way
    (tmp_path / "checkpoints" / "step_00000009").mkdir()         # a directory without state.pt
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ckpt.resolve_checkpoint(tmp_path, "latest").name == "step_00000003"
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "other", "latest")
    with pytest.raises(ckpt.CheckpointError, match="no state.pt"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step_00000009"))


def test_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "checkpoints" / "step_00000001"
    path.mkdir(parents=True)
    torch.save({"evil": object()}, path / "state.pt")
    (path / "model.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(path)


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
