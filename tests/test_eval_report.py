"""The suite report writer: CSV as CLIP_benchmark's `build` makes it, Markdown summary, PNG chart."""
import argparse
import csv
import json
import math

import pytest
from PIL import Image

from clip_train.eval import report
from clip_train.eval.report import (
    build_figure,
    main_metric,
    model_label,
    read_results,
    suite_average,
    write_csv,
    write_markdown,
    write_plot,
    write_reports,
)

VITB = ("ViT-B-32", "/w/vitb32.safetensors")
RN50 = ("RN50", "openai")


def result(model, dataset, task, metrics, **extra):
    return {"dataset": dataset, "model": model[0], "pretrained": model[1], "task": task,
            "metrics": metrics, "language": "en", **extra}


def classification(acc1, acc5, recall):
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def retrieval(i1, i5, i10, t1, t5, t10):
    return {"image_retrieval_recall@1": i1, "image_retrieval_recall@5": i5,
            "image_retrieval_recall@10": i10, "text_retrieval_recall@1": t1,
            "text_retrieval_recall@5": t5, "text_retrieval_recall@10": t10}


def probe(acc1, acc5, recall):
    return {"lp_acc1": acc1, "lp_acc5": acc5, "lp_mean_per_class_recall": recall,
            "weight_decay": 1e-6, "epochs": 10, "seed": 0, "fewshot_k": -1, "normalized": True}


def make_results():
    """2 models x 3 datasets: cifar10 (zero-shot and linear probe), a 3-class set whose acc5 is
    undefined, and a retrieval set."""
    return [
        result(VITB, "cifar10", "zeroshot_classification", classification(0.9, 0.99, 0.89), split="test"),
        result(VITB, "cifar10", "linear_probe", probe(0.95, 0.998, 0.949), split="test"),
        result(VITB, "tri3", "zeroshot_classification", classification(0.6, None, 0.55), split="test"),
        result(VITB, "flickr30k", "zeroshot_retrieval", retrieval(0.5, 0.8, 0.9, 0.6, 0.9, 0.95)),
        result(RN50, "cifar10", "zeroshot_classification", classification(0.7, 0.95, 0.69), split="test"),
        result(RN50, "cifar10", "linear_probe", probe(0.85, 0.99, 0.849), split="test"),
        result(RN50, "tri3", "zeroshot_classification", classification(0.4, None, 0.35), split="test"),
        result(RN50, "flickr30k", "zeroshot_retrieval", retrieval(0.3, 0.6, 0.7, 0.4, 0.7, 0.8)),
    ]


@pytest.fixture
def results():
    return make_results()


def dump(results, directory):
    directory.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(results):
        (directory / f"{i:02d}_{r['model']}_{r['dataset']}_{r['task']}.json").write_text(json.dumps(r))
    return directory


# --- main metric, labels, average ---------------------------------------------------------------

def test_main_metric_per_task(results):
    by = {(r["model"], r["dataset"], r["task"]): r for r in results}
    assert main_metric(by["ViT-B-32", "cifar10", "zeroshot_classification"]) == 0.9
    assert main_metric(by["ViT-B-32", "cifar10", "linear_probe"]) == 0.95
    assert main_metric(by["ViT-B-32", "flickr30k", "zeroshot_retrieval"]) == pytest.approx((0.8 + 0.9) / 2)
    assert main_metric(by["RN50", "flickr30k", "zeroshot_retrieval"]) == pytest.approx((0.6 + 0.7) / 2)


def test_main_metric_multilabel_falls_back_to_auroc():
    both = result(VITB, "chexpert", "zeroshot_multilabel",
                  {"mean_average_precision": 0.4, "macro_auroc": 0.8, "macro_f1": 0.3})
    auroc_only = result(VITB, "ptbxl", "zeroshot_multilabel", {"macro_auroc": 0.75, "macro_f1": 0.2})
    assert main_metric(both) == 0.4
    assert main_metric(auroc_only) == 0.75


def test_main_metric_undefined_values():
    assert main_metric(result(VITB, "c", "zeroshot_classification", classification(None, None, 0.5))) is None
    assert main_metric(result(VITB, "c", "zeroshot_classification", classification(math.nan, None, 0.5))) is None
    # One retrieval direction alone is not the same quantity as their mean.
    half = retrieval(0.5, 0.8, 0.9, 0.6, None, 0.95)
    assert main_metric(result(VITB, "f", "zeroshot_retrieval", half)) is None
    assert main_metric(result(VITB, "x", "some_new_task", {"acc1": 0.5})) is None


def test_model_label():
    assert model_label(result(VITB, "d", "t", {})) == "ViT-B-32 vitb32.safetensors"
    assert model_label(result(RN50, "d", "t", {})) == "RN50 openai"
    assert model_label(result(("RN50", None), "d", "t", {})) == "RN50"
    assert model_label(result(("M", "/runs/a/export/"), "d", "t", {})) == "M export"


def test_same_basename_checkpoints_stay_apart():
    a = result(("M", "/runs/a/final.pt"), "c", "zeroshot_classification", classification(0.2, 0.5, 0.2))
    b = result(("M", "/runs/b/final.pt"), "c", "zeroshot_classification", classification(0.8, 0.9, 0.8))
    assert suite_average([a, b]) == {"M a/final.pt": 0.2, "M b/final.pt": 0.8}


def test_suite_average_by_hand(results):
    vitb = (0.9 + 0.95 + 0.6 + (0.8 + 0.9) / 2) / 4
    rn50 = (0.7 + 0.85 + 0.4 + (0.6 + 0.7) / 2) / 4
    average = suite_average(results)
    assert average.keys() == {"ViT-B-32 vitb32.safetensors", "RN50 openai"}
    assert average["ViT-B-32 vitb32.safetensors"] == pytest.approx(vitb)
    assert average["RN50 openai"] == pytest.approx(rn50)


def test_suite_average_skips_undefined(results):
    results[2]["metrics"]["acc1"] = None  # ViT-B-32 on tri3
    vitb = (0.9 + 0.95 + (0.8 + 0.9) / 2) / 3
    assert suite_average(results)["ViT-B-32 vitb32.safetensors"] == pytest.approx(vitb)


# --- reading --------------------------------------------------------------------------------------

def test_read_results_skips_non_results_and_sorts(results, tmp_path):
    dump(results[::-1], tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps({"models": ["a"], "datasets": ["cifar10"]}))
    (tmp_path / "notes.txt").write_text("not json")
    read = read_results(tmp_path)
    assert len(read) == len(results)
    keys = [(r["model"], r["dataset"], r["task"]) for r in read]
    assert keys == sorted(keys)


def test_read_results_warns_on_a_broken_file(results, tmp_path):
    dump(results[:1], tmp_path)
    (tmp_path / "half.json").write_text('{"dataset": "cifar')
    with pytest.warns(UserWarning, match="half.json"):
        assert len(read_results(tmp_path)) == 1


# --- CSV ----------------------------------------------------------------------------------------

def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def by_identity(rows):
    return sorted(rows, key=lambda row: (row["model_fullname"], row["dataset"], row["task"]))


# main_build reads each file with json.load(open(path)) and never closes it; that is theirs to fix.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_csv_matches_clip_benchmark_build(results, tmp_path):
    from clip_benchmark.cli import main_build

    jsons = dump(results, tmp_path / "results")
    theirs = tmp_path / "theirs.csv"
    main_build(argparse.Namespace(files=[str(jsons)], output=str(theirs)))
    ours = write_csv(read_results(jsons), tmp_path / "ours.csv")

    their_fields, their_rows = read_csv(theirs)
    our_fields, our_rows = read_csv(ours)
    assert set(our_fields) == set(their_fields)
    assert our_fields == sorted(our_fields)
    assert len(our_rows) == len(results)
    assert by_identity(our_rows) == by_identity(their_rows)


def test_csv_cells(results, tmp_path):
    _, rows = read_csv(write_csv(results, tmp_path / "r.csv"))
    tri3 = [row for row in rows if row["dataset"] == "tri3"]
    assert [row["acc5"] for row in tri3] == ["", ""]  # None -> empty cell
    # Columns of other tasks are empty too, not "None".
    retrieval_row = next(row for row in rows if row["task"] == "zeroshot_retrieval")
    assert retrieval_row["acc1"] == "" and retrieval_row["split"] == ""
    # The CSV keeps the full weights path; only md/png shorten it.
    assert {row["model_fullname"] for row in rows} == {"ViT-B-32 /w/vitb32.safetensors", "RN50 openai"}


def test_csv_null_pretrained_and_lists(tmp_path):
    r = result(("RN50", None), "cifar10", "zeroshot_classification", classification(0.7, 0.9, 0.7),
               templates=["a photo of a {c}."], classnames=["cat", "dog"], split="test")
    fields, rows = read_csv(write_csv([r], tmp_path / "r.csv"))
    assert "templates" not in fields and "classnames" not in fields
    assert rows[0]["split"] == "test"
    assert rows[0]["pretrained"] == ""
    assert rows[0]["model_fullname"] == "RN50 "


# --- Markdown -----------------------------------------------------------------------------------

def first_table(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, _separator, *rows = table
    return header, rows


def test_markdown_summary(results, tmp_path):
    text = write_markdown(results, tmp_path / "r.md").read_text()
    header, rows = first_table(text)
    labels = ["RN50 openai", "ViT-B-32 vitb32.safetensors"]
    assert header[:3] == ["dataset", "task", "metric"]
    assert sorted(header[3:]) == labels
    assert {(row[0], row[1]) for row in rows[:-1]} == {
        ("cifar10", "zeroshot_classification"), ("cifar10", "linear_probe"),
        ("tri3", "zeroshot_classification"), ("flickr30k", "zeroshot_retrieval")}
    cifar = next(row for row in rows if row[:2] == ["cifar10", "zeroshot_classification"])
    assert cifar[2] == "acc1"
    assert cifar[3 + header[3:].index("ViT-B-32 vitb32.safetensors")] == "0.9000"

    average_row = rows[-1]
    assert "average" in average_row[0]
    expected = suite_average(results)
    for label in labels:
        assert average_row[header.index(label)] == f"{expected[label]:.4f}"


def test_markdown_full_table_hides_nothing(results, tmp_path):
    text = write_markdown(results, tmp_path / "r.md").read_text()
    full = text.split("## All metrics", 1)[1]
    _, rows = first_table(full)
    assert len(rows) == sum(len(r["metrics"]) for r in results)
    assert ["tri3", "zeroshot_classification", "RN50 openai", "acc5", "n/a"] in rows
    assert ["cifar10", "linear_probe", "RN50 openai", "weight_decay", "1.000e-06"] in rows


def test_markdown_missing_cell_is_na(results, tmp_path):
    text = write_markdown(results[:-1], tmp_path / "r.md").read_text()  # RN50 lacks flickr30k
    header, rows = first_table(text)
    flickr = next(row for row in rows if row[0] == "flickr30k")
    assert flickr[header.index("RN50 openai")] == "n/a"


# --- PNG ----------------------------------------------------------------------------------------

def check_png(path):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_plot_is_a_png_showing_every_model(results, tmp_path):
    width, height = check_png(write_plot(results, tmp_path / "r.png"))
    assert 400 < width < 10_000 and 300 < height < 2_000

    fig = build_figure(results)
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "RN50 openai", "ViT-B-32 vitb32.safetensors"}
    n_groups = 4 + 1  # four (dataset, task) pairs and the average
    assert len(ax.patches) == 2 * n_groups
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "average"
    assert ax.get_title().startswith("Benchmark suite: ")
    assert ax.get_ylim() == (0.0, 1.0)


def test_plot_bars_hold_the_main_metric(results):
    ax = build_figure(results).axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    expected = [main_metric(r) for r in results] + list(suite_average(results).values())
    assert heights == sorted(round(v, 6) for v in expected)


def test_plot_one_model_one_dataset(tmp_path):
    only = [result(VITB, "cifar10", "zeroshot_classification", classification(0.9, 0.99, 0.9))]
    check_png(write_plot(only, tmp_path / "r.png"))
    ax = build_figure(only).axes[0]
    assert len(ax.patches) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ViT-B-32 vitb32.safetensors"]


def test_plot_forty_datasets_grows_wide(tmp_path):
    many = [result(model, f"a_rather_long_dataset_name_{i:02d}", "zeroshot_classification",
                   classification(0.5 + i / 100, None, 0.5)) for i in range(40) for model in (VITB, RN50)]
    width, _ = check_png(write_plot(many, tmp_path / "many.png"))
    few_width, _ = check_png(write_plot(many[:2], tmp_path / "few.png"))
    assert width > 2 * few_width
    ax = build_figure(many).axes[0]
    assert len(ax.patches) == 2 * 41
    assert all(t.get_rotation() > 0 for t in ax.get_xticklabels())


# --- write_reports and atomic writes -----------------------------------------------------------

def test_write_reports_writes_all_three(results, tmp_path):
    dump(results, tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps({"models": 2, "datasets": 3}))
    paths = write_reports(tmp_path, stem="suite_report")
    assert set(paths) == {"csv", "md", "png"}
    assert [paths[k].name for k in ("csv", "md", "png")] == [
        "suite_report.csv", "suite_report.md", "suite_report.png"]
    assert len(read_csv(paths["csv"])[1]) == len(results)
    assert "flickr30k" in paths["md"].read_text()
    check_png(paths["png"])
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "r.md"
    target.write_text("previous\n")

    def fail(f):
        f.write("| half a tab")
        raise KeyboardInterrupt

    from clip_train.eval.atomic import atomic_write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]
