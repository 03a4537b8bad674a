"""One tiny end-to-end run: clip-prep demo -> clip-train -> export -> clip-eval, checked against open_clip
and CLIP_benchmark's own metric code."""
import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clip_train.cli import main as train_main
from clip_train.eval import build_classification_set, build_retrieval_set, load_model, make_loader
from clip_train.eval.cli import main as eval_main
from project_paths import DEMO_CONFIG


@pytest.fixture(scope="module")
def run(demo_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    suite_file = base / "suite.yaml"  # the demo's zero-shot set, with its probe, and its retrieval set
    suite_file.write_text(f"dataset_root: {demo_dataset}/{{dataset}}\n"
                          "datasets:\n  - {name: test, tasks: [zeroshot_classification, linear_probe]}\n"
                          "  - retrieval\n")
    run_dir = base / "run"
    assert train_main(train_args(demo_dataset, run_dir, "train.steps=6", f"eval.suite={suite_file}")) == 0
    return run_dir


def train_args(demo, run_dir, *extra):
    return ["--config", DEMO_CONFIG, f"data.train={demo}/train", f"eval.zeroshot={demo}/test",
            f"eval.retrieval={demo}/retrieval", f"output_dir={run_dir}", "data.batch_size=32",
            "train.log_every=1", "checkpoint.every_steps=3", "eval.every=3", "eval.batch_size=128", *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_every_step_and_the_evals(run):
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"lr", "logit_scale", "samples_per_s", "contrastive", "contrastive/pos_logit_mean",
                "contrastive/neg_logit_mean", "skipped"} <= set(r)
        assert r["loss"] > 0 and r["skipped"] == 0
    evals = [r for r in records if "zeroshot/acc1" in r]
    assert [r["step"] for r in evals] == [3, 6] and "retrieval/image_retrieval_recall@1" in evals[-1]


def test_eval_suite_runs_in_training_with_the_same_code(run):
    """eval.suite at every eval; its zero-shot numbers are eval.zeroshot's (the same code, the same
    model), and the final evaluation writes its result files and reports to RUN/suite."""
    evals = [r for r in read_metrics(run) if "zeroshot/acc1" in r]
    for record in evals:
        assert record["suite/test/zeroshot_classification/acc1"] == record["zeroshot/acc1"]
        assert {"suite/test/linear_probe/lp_acc1", "suite/retrieval/zeroshot_retrieval/image_retrieval_recall@5",
                "suite/average"} <= set(record)
    results = sorted(p.name for p in (run / "suite").glob("*.json"))
    assert len(results) == 3 and all(name.endswith(task + ".json") for name, task in
                                     zip(results, ("zeroshot_retrieval", "linear_probe", "zeroshot_classification")))
    final = json.loads(next((run / "suite").glob("test_*_zeroshot_classification.json")).read_text())
    assert final["metrics"]["acc1"] == evals[-1]["zeroshot/acc1"]
    assert {"results.csv", "results.md", "results.png"} <= {p.name for p in (run / "suite").iterdir()}


def test_export_loads_in_open_clip_with_the_trained_weights(run):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    state = load_file(str(run / "checkpoints" / "step_00000006" / "weights.safetensors"))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run / 'export'}")
    assert model.encode_text(tokenizer(["the digit seven"])).shape == (1, 64)


def test_clip_eval_matches_clip_benchmark_on_the_trained_model(run, demo_dataset, tmp_path, reference_accuracy):
    from clip_benchmark.metrics import zeroshot_retrieval

    out = tmp_path / "zs.json"
    assert eval_main(["--model", str(run), "--dataset", str(demo_dataset / "test"),
                      "--task", "zeroshot_classification", "--output", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert ours["task"] == "zeroshot_classification" and ours["dataset"] == str(demo_dataset / "test")
    loaded = load_model(str(run))
    dataset, classnames, templates = build_classification_set(demo_dataset / "test", loaded.preprocess)
    theirs = reference_accuracy.evaluate(loaded.model, make_loader(dataset, 64, 0), loaded.tokenizer,
                                         classnames, templates, "cpu", amp=False)
    for name, value in theirs.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-4)

    assert eval_main(["--model", str(run / "export"), "--dataset", str(demo_dataset / "retrieval"),
                      "--task", "zeroshot_retrieval", "--output", str(out)]) == 0
    ours = json.loads(out.read_text())["metrics"]
    loader = make_loader(build_retrieval_set(demo_dataset / "retrieval", loaded.preprocess), 64, 0)
    theirs = zeroshot_retrieval.evaluate(loaded.model, loader, loaded.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-4)


def test_export_subcommand_writes_the_checkpoint_weights(run, tmp_path):
    assert train_main(["export", "--run", str(run), "--checkpoint", str(run / "checkpoints" / "step_00000003"),
                       "--out", str(tmp_path / "exp3")]) == 0
    step3 = load_file(str(tmp_path / "exp3" / "open_clip_model.safetensors"))
    final = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert step3.keys() == final.keys()
    assert not torch.equal(step3["text_projection"], final["text_projection"])  # training moved the weights


def test_rerun_refuses_then_resume_continues(run, demo_dataset, capsys):
    assert train_main(train_args(demo_dataset, run, "train.steps=8")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_main(train_args(demo_dataset, run, "train.steps=8", "--resume", "latest")) == 0
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
