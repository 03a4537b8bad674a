"""The prompts are visible: a zero-shot result JSON names the templates (and their source), the class
names and a per-class recall table; report tables ignore them; training-time eval logs the same
metrics as before; and every flag of clip-eval, clip-eval suite and clip-launch sbatch-template has help."""
import argparse
import json

import pytest
import torch

from benchmark_fixtures import DIGIT_NAMES, TEMPLATES, digits, export_random_model, write_classification_root, \
    write_multilabel_root
from clip_train.eval import DEFAULT_TEMPLATES, load_model, report, run_training_eval
from clip_train.eval.cli import build_parser, build_suite_parser, main
from clip_train.eval.known_datasets import classification_metadata
from clip_train.eval.multilabel import multilabel_metrics
from clip_train.eval.prompts import PROMPT_KEYS, class_keys
from clip_train.eval.zeroshot import classification_result
from launch.cli import launch_parser, sbatch_parser

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")]

TEST_DIGITS = range(0, 30)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(export_random_model(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def with_templates(tmp_path_factory):
    """CLIP_benchmark-layout digits with their own zeroshot_classification_templates.txt."""
    return write_classification_root(tmp_path_factory.mktemp("own") / "digits", {"test": TEST_DIGITS}, per_shard=16)


@pytest.fixture(scope="module")
def without_templates(tmp_path_factory):
    """The same set without a templates file: the built-in default applies (or a named dataset's)."""
    root = write_classification_root(tmp_path_factory.mktemp("bare") / "digits", {"test": TEST_DIGITS}, per_shard=16)
    (root / "zeroshot_classification_templates.txt").unlink()
    return root


def _evaluate(model, root, tmp_path, *extra, task="zeroshot_classification"):
    output = tmp_path / f"{task}.json"
    argv = ["--model", model, "--dataset", str(root), "--task", task, "--output", str(output),
            "--batch-size", "16", "--device", "cpu", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads(output.read_text())


def _hand_counts(indices):
    _, labels = digits()
    return [sum(1 for i in indices if int(labels[i]) == c) for c in range(10)]


def _check_recall_table(result, counts):
    """Counts as hand-counted from the labels; recalls consistent with the CLIP_benchmark metrics."""
    table = result["per_class_recall"]
    assert list(table) == result["classnames"]  # class order, keyed by name
    assert [entry["count"] for entry in table.values()] == counts
    for entry in table.values():
        recall, count = entry["recall"], entry["count"]
        assert recall is None if count == 0 else recall == round(recall * count) / count  # exactly hits / count
    defined = [e["recall"] for e in table.values() if e["recall"] is not None]
    assert sum(defined) / len(defined) == pytest.approx(result["metrics"]["mean_per_class_recall"], abs=1e-12)
    hits = sum(round(e["recall"] * e["count"]) for e in table.values() if e["count"])
    assert hits / sum(counts) == pytest.approx(result["metrics"]["acc1"], abs=1e-12)


def test_result_names_the_dataset_own_templates(model, with_templates, tmp_path):
    result = _evaluate(model, with_templates, tmp_path)
    assert result["templates"] == TEMPLATES
    assert result["templates_source"] == {"kind": "dataset_file",
                                          "path": str(with_templates / "zeroshot_classification_templates.txt")}
    assert result["classnames"] == DIGIT_NAMES
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}  # CLIP_benchmark's, unchanged
    _check_recall_table(result, _hand_counts(TEST_DIGITS))


def test_result_names_the_builtin_default_when_the_data_has_none(model, without_templates, tmp_path):
    result = _evaluate(model, without_templates, tmp_path)
    assert result["templates"] == list(DEFAULT_TEMPLATES)
    assert result["templates_source"] == {"kind": "builtin_default"}
    assert result["classnames"] == DIGIT_NAMES


def test_result_names_shipped_prompts_and_a_given_file(model, without_templates, tmp_path):
    shipped = _evaluate(model, without_templates, tmp_path, "--dataset-name", "mnist")
    assert shipped["templates"] == classification_metadata("mnist")[1]
    assert shipped["templates_source"] == {"kind": "shipped_metadata", "dataset": "mnist"}
    assert shipped["classnames"] == DIGIT_NAMES  # the data's classnames.txt wins over the shipped names
    given = tmp_path / "mine.txt"
    given.write_text("{c}\nthe digit {c}\n")
    mine = _evaluate(model, without_templates, tmp_path, "--templates", str(given))
    assert mine["templates"] == ["{c}", "the digit {c}"]
    assert mine["templates_source"] == {"kind": "given_file", "path": str(given)}


def test_multilabel_result_names_prompts_and_recall(model, tmp_path):
    root = write_multilabel_root(tmp_path / "ml", range(0, 24), per_shard=12)
    result = _evaluate(model, root, tmp_path, task="zeroshot_multilabel")
    names = DIGIT_NAMES + ["even number", "odd number"]
    assert result["templates"] == TEMPLATES and result["classnames"] == names
    assert result["templates_source"]["kind"] == "dataset_file"
    counts = _hand_counts(range(0, 24))
    evens = sum(counts[0::2])
    assert [e["count"] for e in result["per_class_recall"].values()] == counts + [evens, 24 - evens]
    assert "per_class_recall" not in result["metrics"]


def test_single_label_recall_by_hand():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 0, 1, 1, 0, 2, 3, 2])
    logits = torch.nn.functional.one_hot(predictions, 4).float()
    table = classification_result(logits, targets, ["cat", "dog", "fox", "owl"])["per_class_recall"]
    assert table == {"cat": {"recall": 2 / 3, "count": 3}, "dog": {"recall": 1.0, "count": 2},
                     "fox": {"recall": 0.5, "count": 4}, "owl": {"recall": None, "count": 0}}
    assert table["cat"]["recall"] == 0.6666666666666666  # float64, not float32's 0.6666666865


def test_multilabel_recall_by_hand():
    # sample 0 has 2 labels (top 2 count), samples 1-3 one label (top 1 counts)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.7, 0.6, 0.1], [0.1, 0.2, 0.3]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    table = multilabel_metrics(scores, targets, ["a", "b", "c"])["per_class_recall"]
    assert table == {"a": {"recall": 1.0, "count": 1}, "b": {"recall": 0.5, "count": 2},
                     "c": {"recall": 1.0, "count": 2}}
    assert "per_class_recall" not in multilabel_metrics(scores, targets)  # without class names, as before


def test_repeated_class_names_get_unique_keys():
    assert class_keys(["missile", "tank", "missile"]) == ["missile [0]", "tank", "missile [2]"]


def test_report_tables_ignore_the_prompt_keys(model, with_templates, tmp_path):
    result = _evaluate(model, with_templates, tmp_path / "out")
    result["templates_source"] = "a string would be a CSV column"  # even scalar prompt keys stay out
    row = report.csv_row(result)
    assert not set(PROMPT_KEYS) & set(row)
    assert set(row) == set(result["metrics"]) | {"dataset", "model", "pretrained", "task", "language",
                                                 "model_fullname"}
    text = report.markdown([result])
    assert "| per_class_recall |" not in text and "| templates" not in text and TEMPLATES[0] not in text


def test_training_eval_logs_the_same_metric_keys(model, with_templates, tmp_path):
    loaded = load_model(model)
    multilabel = write_multilabel_root(tmp_path / "ml", range(0, 24), per_shard=12)
    results = run_training_eval(loaded.model, loaded.preprocess, loaded.tokenizer, zeroshot_path=with_templates,
                                multilabel_path=multilabel, batch_size=16)
    assert set(results) == {"zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall",
                            "multilabel/mean_average_precision", "multilabel/macro_auroc", "multilabel/macro_f1",
                            "multilabel/classes_scored"}
    assert all(isinstance(v, (int, float)) for v in results.values())


@pytest.mark.parametrize("parser", [build_parser(), build_suite_parser(), sbatch_parser(), launch_parser()],
                         ids=["clip-eval", "clip-eval suite", "clip-launch sbatch-template", "clip-launch"])
def test_every_flag_has_help(parser):
    for action in parser._actions:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, action.option_strings
        if parser.prog != "clip-launch" and not isinstance(action, argparse._HelpAction):
            # the accepted values and the default, in one line
            assert "default" in action.help or "required" in action.help, action.option_strings
