"""The composed objective: term registry, weights, per-term metrics, the inputs each term asks for,
recipes with a base, and CoCa captioning training through the trainer."""
import json

import pytest
import torch

from clip_train.config import ConfigError, load_config
from clip_train.engine.trainer import Trainer, TrainingError
from clip_train.losses import decoupled_contrastive_loss, softmax_contrastive_loss
from clip_train.losses.geometry import alignment_loss
from clip_train.losses.objective import TERMS, Objective, TermInputs
from project_paths import CONFIGS

ISSUE_TERM_NAMES = {"contrastive", "caption", "intra_image", "intra_text", "embed_dropout", "uniformity",
                    "alignment", "dcl", "hard_negative"}


def features(n=12, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1) for _ in range(2))
    return TermInputs(a, b, torch.tensor(10.0))


def objective(*overrides):
    cfg = load_config(None, list(overrides))
    return Objective(cfg.objective, cfg.loss)


def test_every_term_of_the_issue_is_registered():
    assert set(TERMS.names()) == ISSUE_TERM_NAMES


def test_weighted_sum_and_per_term_metrics():
    inputs = features()
    total, metrics = objective("objective.terms.dcl=0.5", "objective.terms.alignment=0.25")(inputs)
    infonce = softmax_contrastive_loss(inputs.image_features, inputs.text_features, inputs.logit_scale)[0]
    dcl = decoupled_contrastive_loss(inputs.image_features, inputs.text_features, inputs.logit_scale)[0]
    align = alignment_loss(inputs.image_features, inputs.text_features)[0]
    assert total.item() == pytest.approx((infonce + 0.5 * dcl + 0.25 * align).item(), rel=1e-6)
    assert metrics["contrastive"] == pytest.approx(infonce.item()) and metrics["dcl"] == pytest.approx(dcl.item())
    assert "contrastive/pos_logit_mean" in metrics and "alignment" in metrics


def test_zero_weight_switches_a_term_off_and_unknown_terms_are_refused():
    _, metrics = objective("objective.terms.contrastive=0", "objective.terms.dcl=1")(features())
    assert "contrastive" not in metrics and "dcl" in metrics
    with pytest.raises(ConfigError, match="unknown term 'intra_audio'; valid terms: alignment, caption"):
        objective("objective.terms.intra_audio=1")


def test_terms_declare_the_inputs_they_need():
    assert objective().needs == set()
    assert objective("objective.terms.intra_image=1", "objective.terms.intra_text=1").needs == {"image_view2",
                                                                                             "text_views"}
    assert objective("objective.terms.caption=2").needs == {"caption"}


def test_recipes_with_a_base_override_only_what_they_name(tmp_path):
    cfg = load_config(CONFIGS / "demo-dcl.yaml")
    demo = load_config(CONFIGS / "demo.yaml")
    assert cfg.objective.terms == {"contrastive": 0.0, "dcl": 1.0}
    assert (cfg.model, cfg.data, cfg.optim) == (demo.model, demo.data, demo.optim)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")


def trainer(demo, run_dir, *overrides):
    cfg = load_config(CONFIGS / "demo.yaml", [f"data.train={demo}/train", f"output_dir={run_dir}", "data.workers=0",
                                              "data.batch_size=16", "eval.zeroshot=", "eval.retrieval=",
                                              "train.log_every=1", *overrides])
    return Trainer(cfg)


def test_every_term_trains_and_is_logged_under_its_name(demo_dataset, tmp_path):
    terms = ["intra_image=0.5", "intra_text=0.5", "embed_dropout=0.5", "uniformity=0.1", "alignment=0.1",
             "dcl=0.5", "hard_negative=0.5"]
    run = trainer(demo_dataset, tmp_path, "train.steps=2", *(f"objective.terms.{t}" for t in terms))
    batch = next(iter(run.data.epoch_batches(0)))
    assert {"image_view2", "text_view1", "text_view2"} <= set(batch)
    assert not torch.equal(batch["image"], batch["image_view2"])  # two augmentations of the same images
    run.train()
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for name in ["contrastive"] + [t.split("=")[0] for t in terms]:
        assert isinstance(logged[name], float), name


def test_coca_caption_loss_falls(demo_dataset, tmp_path):
    run = trainer(demo_dataset, tmp_path, "model.name=demo-tiny-coca", "objective.terms.caption=2",
                  "optim.warmup_steps=0", "optim.lr=2e-3")
    batch = next(iter(run.data.epoch_batches(0)))
    caption_losses = [run.train_step([batch])["caption"] for _ in range(10)]
    assert caption_losses[-1] < 0.85 * caption_losses[0], caption_losses


def test_caption_needs_coca_and_views_need_plain_steps(demo_dataset, tmp_path):
    with pytest.raises(TrainingError, match="needs a CoCa model"):
        trainer(demo_dataset, tmp_path / "a", "objective.terms.caption=2")
    with pytest.raises(TrainingError, match="use train.accum_steps=1"):
        trainer(demo_dataset, tmp_path / "b", "objective.terms.intra_image=1", "train.accum_steps=2")
