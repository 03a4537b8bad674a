"""`clip-eval suite`: two models over CLIP_benchmark-layout sets; result files, CSV, markdown, plot;
a suite killed midway resumes without recomputing what it wrote; fail-fast planning; and two-rank
data-parallel evaluation equal to the single-process one."""
import json
import sys
import time

import pytest
from PIL import Image

import preloaded
from benchmark_fixtures import DIGIT_NAMES, TEMPLATES, export_random_model, write_classification_root, \
    write_retrieval_root
from clip_train.eval import suite
from clip_train.eval.cli import main
from dist_harness import run_workers

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")]

TASKS = "zeroshot_classification,linear_probe,zeroshot_retrieval"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """`wds_digits` (classification, test + train) and `wds_digitcaps` (retrieval) under one root."""
    root = tmp_path_factory.mktemp("benchmarks")
    write_classification_root(root / "wds_digits", {"test": range(0, 120), "train": range(120, 360)}, per_shard=40)
    write_retrieval_root(root / "wds_digitcaps", range(0, 48), per_shard=16)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return [str(export_random_model(base / name, seed=seed)) for seed, name in enumerate(("alpha", "beta"))]


def suite_args(sets, models, out, *extra):
    model_args = [arg for m in models for arg in ("--model", m)]
    return ["suite", *model_args, "--datasets", "digits,digitcaps", "--dataset-root", str(sets / "wds_{dataset}"),
            "--tasks", TASKS, "--output", str(out), "--device", "cpu", "--no-progress", *extra]


def test_suite_writes_every_result_and_the_reports(tmp_path, sets, models, capsys):
    out = tmp_path / "suite"
    assert main(suite_args(sets, models, out)) == 0
    results = sorted(out.glob("*.json"))
    assert [p.name for p in results] == sorted(
        f"{d}_None_{m}_en_{t}.json" for m in ("alpha", "beta") for d, t in
        (("digits", "zeroshot_classification"), ("digits", "linear_probe"), ("digitcaps", "zeroshot_retrieval")))
    record = json.loads((out / "digits_None_alpha_en_zeroshot_classification.json").read_text())
    assert set(record) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert record["dataset"] == "digits" and set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert record["templates"] == TEMPLATES and record["classnames"] == DIGIT_NAMES
    assert record["templates_source"] == {"kind": "dataset_file",
                                          "path": str(sets / "wds_digits" / "zeroshot_classification_templates.txt")}
    assert list(record["per_class_recall"]) == DIGIT_NAMES
    assert sum(entry["count"] for entry in record["per_class_recall"].values()) == 120
    probe = json.loads((out / "digits_None_alpha_en_linear_probe.json").read_text())
    assert "templates" not in probe  # the linear probe uses no prompts

    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 6
    assert not {"templates", "templates_source", "classnames", "per_class_recall"} & set(csv_rows[0].split(","))
    markdown = (out / "results.md").read_text()
    assert "alpha" in markdown and "beta" in markdown and "average" in markdown
    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(png).verify()
    from clip_train.eval import report

    figure = report.build_figure(report.read_results(out))
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert len(legend) == 2 and all(any(name in label for label in legend) for name in ("alpha", "beta"))
    printed = capsys.readouterr().out
    assert "| digits" in printed and "results.png" in printed


def test_a_killed_suite_resumes_without_recomputing(tmp_path, sets, models, monkeypatch):
    out = tmp_path / "suite"
    log = tmp_path / "suite.log"
    process = preloaded.start([sys.executable, "-m", "clip_train.eval.cli", *suite_args(sets, models, out)], log)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.json")) and time.monotonic() < deadline and process.is_alive():
        time.sleep(0.2)
    process.kill()
    preloaded.wait(process, 30)
    written = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 1 <= len(written) < 6, preloaded.tail(log)

    computed = []
    run_job = suite.run_job
    monkeypatch.setattr(suite, "run_job", lambda job, *a, **k: computed.append(job) or run_job(job, *a, **k))
    assert main(suite_args(sets, models, out)) == 0
    assert len(computed) == 6 - len(written)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # finished results were not rewritten
    assert len(list(out.glob("*.json"))) == 6 and (out / "results.png").is_file()


def test_suite_plans_every_dataset_before_loading_a_model(tmp_path, sets, models, capsys, monkeypatch):
    import clip_train.eval.suite as suite_module

    monkeypatch.setattr(suite_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = suite_args(sets, models, tmp_path / "out")
    args[args.index("digits,digitcaps")] = "digits,digitcaps,cifar1000"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip-eval: error: unknown dataset 'cifar1000'") and "cifar100" in err
    assert len(err.splitlines()) == 1


def test_suite_file_names_datasets_and_tasks(tmp_path, sets, models):
    spec = tmp_path / "suite.yaml"
    spec.write_text(f"dataset_root: {sets}/wds_{{dataset}}\ndatasets:\n  - digitcaps\n"
                    f"  - {{name: digits, tasks: [linear_probe]}}\n")
    out = tmp_path / "out"
    assert main(["suite", "--model", models[0], "--suite", str(spec), "--output", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == [
        "digitcaps_None_alpha_en_zeroshot_retrieval.json", "digits_None_alpha_en_linear_probe.json"]


# --- two ranks ---------------------------------------------------------------------------------------


def _rank_runs_cli(rank, world, args):
    # each rank runs clip-eval as torchrun would start it (the env describes the process group)
    return main(args)


@pytest.mark.parametrize("task", ["zeroshot_classification", "zeroshot_retrieval", "linear_probe"])
def test_two_ranks_equal_one_process(tmp_path, sets, models, task):
    dataset = sets / ("wds_digitcaps" if task == "zeroshot_retrieval" else "wds_digits")
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    common = ["--model", models[0], "--dataset", str(dataset), "--task", task, "--device", "cpu", "--batch-size", "16"]
    assert main([*common, "--output", str(single)]) == 0
    (tmp_path / "ranks").mkdir()
    assert run_workers(_rank_runs_cli, 2, tmp_path / "ranks", [*common, "--output", str(double)], init="env") == [0, 0]
    ours, theirs = json.loads(double.read_text())["metrics"], json.loads(single.read_text())["metrics"]
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_model_forms_and_result_names(tmp_path):
    weights = tmp_path / "vit_b_32.safetensors"
    weights.write_bytes(b"")
    model = suite.parse_model(f"ViT-B-32,{weights}")
    assert model == suite.SuiteModel("ViT-B-32", str(weights))
    job = suite.SuiteJob(model, "vtab/dtd", "zeroshot_classification", None)
    # CLIP_benchmark's --output default, with its slugs: "/" -> "_", a weights file by its base name
    assert suite.result_path(tmp_path, job).name == "vtab_dtd_vit_b_32.safetensors_ViT-B-32_en_zeroshot_classification.json"
    assert suite.dataset_root("/d/wds_{dataset_cleaned}", "vtab/dtd").as_posix() == "/d/wds_vtab-dtd"
    with pytest.raises(suite.EvalError, match="must contain"):
        suite.dataset_root("/d/fixed", "cifar10")


def test_known_dataset_name_under_a_cleaned_template(tmp_path, sets, models):
    import shutil

    shutil.copytree(sets / "wds_digits", tmp_path / "wds_vtab-dtd")  # the data carries its own class names
    out = tmp_path / "out"
    assert main(["suite", "--model", models[0], "--datasets", "vtab/dtd", "--dataset-root",
                 str(tmp_path / "wds_{dataset_cleaned}"), "--output", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    record = json.loads((out / "vtab_dtd_None_alpha_en_zeroshot_classification.json").read_text())
    assert record["dataset"] == "vtab/dtd" and record["metrics"]["acc1"] is not None


def test_a_two_rank_suite_writes_the_single_process_results(tmp_path, sets, models):
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(suite_args(sets, models[:1], single)) == 0
    (tmp_path / "ranks").mkdir()
    assert run_workers(_rank_runs_cli, 2, tmp_path / "ranks", suite_args(sets, models[:1], double), init="env") == [0, 0]
    names = sorted(p.name for p in single.glob("*.json"))
    assert names == sorted(p.name for p in double.glob("*.json")) and len(names) == 3
    for name in names:
        ours, theirs = (json.loads((d / name).read_text())["metrics"] for d in (double, single))
        assert ours == pytest.approx(theirs, abs=1e-6), name


def test_models_in_same_named_folders_get_distinct_result_files(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run / "export").mkdir(parents=True)
    models = suite.with_slugs([suite.SuiteModel(str(tmp_path / run / "export")) for run in ("a", "b")]
                              + [suite.SuiteModel("ViT-B-32")])
    assert [m.slug for m in models] == ["a_export", "b_export", "ViT-B-32"]
