"""Trainer steps under DeepSpeed: GradCache equals the full-batch step; non-finite steps are skipped."""
import math

import pytest
import torch

from clip_train.config import load_config
from clip_train.engine.trainer import Trainer, TrainingError
from project_paths import DEMO_CONFIG


def make_trainer(demo, run_dir, *overrides):
    cfg = load_config(DEMO_CONFIG, [f"data.train={demo}/train", f"output_dir={run_dir}", "data.workers=0",
                                    "eval.zeroshot=", "eval.retrieval=", "optim.warmup_steps=0", *overrides])
    return Trainer(cfg)


def fixed_batch(trainer, n=32):
    generator = torch.Generator().manual_seed(0)
    captions = [f"a handwritten digit {i % 10}" for i in range(n)]
    return {"image": torch.randn(n, 3, 32, 32, generator=generator), "text": trainer.built.tokenizer(captions),
            "skipped": 0}


def halves(batch):
    return [{k: (v[:16] if torch.is_tensor(v) else v) for k, v in batch.items()},
            {k: (v[16:] if torch.is_tensor(v) else 0) for k, v in batch.items()}]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_gradcache_step_equals_the_full_batch_step(demo_dataset, tmp_path, zero_stage):
    full = make_trainer(demo_dataset, tmp_path / "full", "data.batch_size=32", f"ds.zero_stage={zero_stage}")
    cached = make_trainer(demo_dataset, tmp_path / "cached", "data.batch_size=16", "train.accum_steps=2",
                          f"ds.zero_stage={zero_stage}")
    assert cached.ds_config["train_batch_size"] == full.ds_config["train_batch_size"] == 32
    batch = fixed_batch(full)
    full_metrics = full.train_step([batch])
    cached_metrics = cached.train_step(halves(batch))
    assert float(cached_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-6)
    assert cached.step == full.step == 1
    for (name, a), b in zip(full.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    moved = [not torch.equal(p, q) for p, q in zip(full.model.parameters(), make_trainer(
        demo_dataset, tmp_path / "init", "data.batch_size=32").model.parameters())]
    assert all(moved)  # the step really updated every parameter


def test_nonfinite_loss_skips_the_step_and_stops_after_k(demo_dataset, tmp_path, monkeypatch):
    trainer = make_trainer(demo_dataset, tmp_path, "data.batch_size=32", "train.max_nonfinite=2")
    batch = fixed_batch(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real_loss = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda inputs: (real_loss(inputs)[0] * float("nan"), {}))
    metrics = trainer.train_step([batch])
    assert math.isnan(metrics["loss"]) and metrics["skipped_step"] and trainer.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # no update
    monkeypatch.setattr(trainer, "compute_loss", real_loss)
    assert "skipped_step" not in trainer.train_step([batch]) and trainer.nonfinite_streak == 0
    monkeypatch.setattr(trainer, "compute_loss", lambda inputs: (real_loss(inputs)[0] * float("inf"), {}))
    trainer.train_step([batch])
    with pytest.raises(TrainingError, match="2 consecutive steps had a non-finite loss"):
        trainer.train_step([batch])


def test_nonfinite_weights_are_never_saved(demo_dataset, tmp_path):
    trainer = make_trainer(demo_dataset, tmp_path, "data.batch_size=32")
    assert trainer.save() is not None
    with torch.no_grad():
        trainer.model.text_projection[0, 0] = float("nan")
    trainer.step = 5
    assert trainer.save() is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000000"]


def test_activation_checkpointing_gives_the_same_step(demo_dataset, tmp_path):
    plain = make_trainer(demo_dataset, tmp_path / "plain", "data.batch_size=32")
    checkpointed = make_trainer(demo_dataset, tmp_path / "ckpt", "data.batch_size=32", "model.grad_checkpointing=true")
    assert checkpointed.model.visual.transformer.grad_checkpointing
    batch = fixed_batch(plain)
    assert float(checkpointed.train_step([batch])["loss"]) == pytest.approx(float(plain.train_step([batch])["loss"]), rel=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_zero3_checkpoint_weights_are_deepspeeds_fp32_masters(demo_dataset, tmp_path):
    import subprocess
    import sys

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = tmp_path / "z3"
    subprocess.run([sys.executable, "-m", "clip_train.cli", "--config", DEMO_CONFIG, f"data.train={demo_dataset}/train",
                    f"output_dir={run}", "data.batch_size=32", "data.workers=0", "train.steps=2",
                    "ds.zero_stage=3", "eval.zeroshot=", "eval.retrieval="], check=True, capture_output=True)
    checkpoint = run / "checkpoints" / "step_00000002"
    ours = load_file(str(checkpoint / "weights.safetensors"))
    from_partitions = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    for name, value in from_partitions.items():
        torch.testing.assert_close(ours[name], value.float(), rtol=0, atol=0, msg=name)
    subprocess.run([sys.executable, "-m", "clip_train.cli", "export", "--run", str(run), "--out", str(tmp_path / "exp")],
                   check=True, capture_output=True)
    exported = load_file(str(tmp_path / "exp" / "open_clip_model.safetensors"))
    exported_at_the_end = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert exported.keys() == exported_at_the_end.keys()
    for name, value in exported_at_the_end.items():
        assert torch.equal(exported[name], value), name
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exp'}")
    assert torch.equal(model.state_dict()["text_projection"], from_partitions["text_projection"].float())
