"""Reports of a benchmark suite: one CSV, one Markdown summary and one PNG bar chart.

A suite writes one JSON per (model, dataset, task) in CLIP_benchmark's result shape::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "metrics": {...}, "language": "en"}

(zero-shot classification and multilabel results also carry ``templates_source``, ``templates``,
``classnames`` and ``per_class_recall``, see ``prompts``; the tables read only ``metrics`` and
the scalar keys above, so those stay out of them).

The CSV has the columns of CLIP_benchmark's ``clip_benchmark build`` (``main_build``), so tables
made by either tool can be concatenated. The Markdown and the plot reduce each result to one number,
its task's main metric (``MAIN_METRIC``), and average those per model.

Every file is written to a temporary file next to its target and moved into place with os.replace,
so a suite interrupted mid-report leaves the previous report, never half of a new one.
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from clip_train.eval.atomic import atomic_write
from clip_train.eval.prompts import PROMPT_KEYS
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The metric that stands for a task in the summary. Two tasks need more than a key lookup:
# multilabel results carry mAP and/or macro AUROC (ECG sets report AUROC only), and retrieval
# has two directions, averaged at recall@5 so neither direction dominates.
MAIN_METRIC = {
    "zeroshot_classification": "acc1",
    "linear_probe": "lp_acc1",
    "zeroshot_multilabel": "mean_average_precision",
    "zeroshot_retrieval": "recall@5",
}
MULTILABEL_FALLBACK = "macro_auroc"
RETRIEVAL_PARTS = ("image_retrieval_recall@5", "text_retrieval_recall@5")

# Keys that make a JSON file a result; anything else in the directory (a suite manifest, a config)
# is not one and is skipped.
_RESULT_KEYS = ("dataset", "model", "task", "metrics")
_SCALARS = (str, int, float, bool, type(None))

# Matplotlib's Agg canvas cannot exceed 2**16 pixels a side; past that the chart gets denser instead.
_MAX_WIDTH_IN = 600.0
_DPI = 100
# Tick labels name the task briefly: the full names ("zeroshot_classification") are wider than a group.
_TASK_SHORT = {
    "zeroshot_classification": "zero-shot",
    "zeroshot_retrieval": "retrieval",
    "zeroshot_multilabel": "multilabel",
    "linear_probe": "linear probe",
}
_TICK_CHAR_IN = 0.075  # rough width of one 8-point character, to decide when labels must rotate


# --- one result -------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """A metric as a float, or None when undefined (None, NaN: CLIP_benchmark writes NaN for acc5
    with fewer than 5 classes, and an undefined value must not drag an average down or to NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def main_metric_name(result: dict) -> str | None:
    """The name of the metric `main_metric` reads for this result (None for an unknown task)."""
    task = result.get("task")
    if task == "zeroshot_multilabel":
        metrics = result.get("metrics") or {}
        if _number(metrics.get(MAIN_METRIC[task])) is None and MULTILABEL_FALLBACK in metrics:
            return MULTILABEL_FALLBACK
    return MAIN_METRIC.get(task)


def main_metric(result: dict) -> float | None:
    """The one number a result contributes to the suite average and the plot; None when undefined."""
    metrics = result.get("metrics") or {}
    if result.get("task") == "zeroshot_retrieval":
        parts = [_number(metrics.get(key)) for key in RETRIEVAL_PARTS]
        # Both directions or nothing: one direction alone would not be the same quantity.
        return None if None in parts else sum(parts) / len(parts)
    name = main_metric_name(result)
    return None if name is None else _number(metrics.get(name))


def _path_tail(pretrained: str, depth: int) -> str:
    """The last `depth` components of a weights path ("" components from a trailing slash dropped)."""
    parts = [part for part in pretrained.replace("\\", "/").split("/") if part]
    return "/".join(parts[-depth:]) if parts else pretrained


def _is_path(pretrained: str) -> bool:
    return "/" in pretrained or "\\" in pretrained


def model_label(result: dict, depth: int = 1) -> str:
    """CLIP_benchmark's model_fullname (model + " " + pretrained), shortened for md/png: a path
    keeps only its last `depth` components; a null pretrained gives just the model name."""
    model = str(result["model"])
    pretrained = result.get("pretrained")
    if pretrained is None or pretrained == "":
        return model
    pretrained = str(pretrained)
    return f"{model} {_path_tail(pretrained, depth) if _is_path(pretrained) else pretrained}"


def _model_key(result: dict) -> tuple[str, str]:
    """What identifies a model: its full name and weights, never the shortened label."""
    pretrained = result.get("pretrained")
    return str(result["model"]), "" if pretrained is None else str(pretrained)


def model_labels(results: Iterable[dict]) -> dict[tuple[str, str], str]:
    """Display label per model, unique: `model_label`, with more path components where two runs'
    checkpoints share a basename (``/runs/a/final.pt`` and ``/runs/b/final.pt``), so the summary
    never merges two models into one column."""
    firsts = {}
    for result in results:
        firsts.setdefault(_model_key(result), result)
    deepest = max((len(_path_tail(key[1], 10**6).split("/")) for key in firsts), default=1)
    for depth in range(1, deepest + 1):
        labels = {key: model_label(result, depth) for key, result in firsts.items()}
        if len(set(labels.values())) == len(labels):
            return labels
    # Only reachable when two different (model, pretrained) pairs print alike ("A B"+"C" vs
    # "A"+"B C"); the full pair is unambiguous.
    return {key: f"{key[0]} [{key[1]}]" for key in firsts}


# --- reading ----------------------------------------------------------------------------------

def _is_result(data: Any) -> bool:
    return (isinstance(data, dict) and all(key in data for key in _RESULT_KEYS)
            and isinstance(data["metrics"], dict))


def _sort_key(result: dict) -> tuple:
    return (str(result["model"]), str(result["dataset"]), str(result["task"]),
            _model_key(result)[1], str(result.get("language", "")))


def _sorted(results: Iterable[dict]) -> list[dict]:
    return sorted(results, key=_sort_key)


def read_results(out_dir) -> list[dict]:
    """Every result JSON directly in `out_dir`, sorted by (model, dataset, task).

    JSON files that are not result-shaped (a suite manifest, a config) are skipped silently; files
    that do not parse are skipped with a warning, since a result may be missing from the tables.
    """
    results = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            warnings.warn(f"skipping unreadable result file {path}: {error}", stacklevel=2)
            continue
        if _is_result(data):
            results.append(data)
    return _sorted(results)


# --- aggregation ------------------------------------------------------------------------------

def suite_average(results) -> dict[str, float]:
    """Per model label: mean of main_metric over its results (undefined values skipped).

    A model whose every main metric is undefined is left out rather than given a made-up number.
    """
    results = _sorted(results)
    labels = model_labels(results)
    values: dict[str, list[float]] = {label: [] for label in labels.values()}
    for result in results:
        value = main_metric(result)
        if value is not None:
            values[labels[_model_key(result)]].append(value)
    return {label: sum(vals) / len(vals) for label, vals in values.items() if vals}


def _groups(results: list[dict]) -> list[tuple[str, str]]:
    """(dataset, task) pairs, sorted: the rows of the summary table and the groups of the plot."""
    return sorted({(str(r["dataset"]), str(r["task"])) for r in results})


def _main_table(results: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(dataset, task) -> model label -> result; warns when one model has two results for a cell
    (e.g. two languages of one dataset), where the table can show only the last in sort order."""
    labels = model_labels(results)
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for result in results:
        cell = table.setdefault((str(result["dataset"]), str(result["task"])), {})
        label = labels[_model_key(result)]
        if label in cell:
            warnings.warn(f"{label} has several results for {result['dataset']}/{result['task']};"
                          " the summary shows one, the CSV and the full table show all", stacklevel=3)
        cell[label] = result
    return table


def _metric_title(results: list[dict]) -> str:
    """"task=metric" for each task present, naming the fallback where a result used one."""
    names: dict[str, list[str]] = {}
    for result in results:
        task = str(result["task"])
        name = main_metric_name(result) or "n/a"
        if task == "zeroshot_retrieval":
            name = "mean image/text recall@5"
        if name not in names.setdefault(task, []):
            names[task].append(name)
    return ", ".join(f"{task}={'/'.join(found)}" for task, found in sorted(names.items()))


# --- writing ----------------------------------------------------------------------------------

def csv_row(result: dict) -> dict:
    """One CSV row exactly as CLIP_benchmark's main_build builds it: metrics, then the top-level
    keys (which win on a name clash, as there), then model_fullname; lists and dicts are skipped, and
    so are the prompt descriptions (`prompts.PROMPT_KEYS`), which CLIP_benchmark's results lack."""
    row = {key: value for key, value in result["metrics"].items() if isinstance(value, _SCALARS)}
    row.update((key, value) for key, value in result.items()
               if key != "metrics" and key not in PROMPT_KEYS and isinstance(value, _SCALARS))
    # main_build computes model + " " + pretrained, a TypeError for a null pretrained; a null
    # pretrained is written as "" here, so the name is "model " and the file still gets written.
    pretrained = result.get("pretrained")
    row["model_fullname"] = str(result["model"]) + " " + ("" if pretrained is None else str(pretrained))
    return row


def write_csv(results, path) -> Path:
    """CLIP_benchmark `build` columns, one row per result; fieldnames are the sorted union (theirs
    is an unordered set; sorted makes the file reproducible). None and absent values are empty."""
    rows = [csv_row(result) for result in _sorted(results)]
    fieldnames = sorted({key for row in rows for key in row})

    def write(f):
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)

    return atomic_write(path, write)


def _cell(value: Any) -> str:
    """A Markdown cell: floats to 4 decimals, tiny non-zero ones (a weight decay) in e-notation
    so they do not read as 0.0000, missing values as n/a, and pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3e}" if 0 < abs(value) < 5e-5 else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results) -> str:
    """The Markdown report: main metric per (dataset, task) and model with an average row, then
    every metric of every result."""
    results = _sorted(results)
    labels = list(dict.fromkeys(model_labels(results).values()))
    table = _main_table(results)
    rows = []
    for dataset, task in _groups(results):
        cell = table[(dataset, task)]
        names = dict.fromkeys(main_metric_name(r) or "n/a" for r in cell.values())
        if task == "zeroshot_retrieval":
            names = {"mean(image,text)_recall@5": None}
        rows.append([_cell(dataset), _cell(task), _cell("/".join(names))]
                    + [_cell(main_metric(cell[label]) if label in cell else None) for label in labels])
    average = suite_average(results)
    rows.append(["**average**", "", ""] + [_cell(average.get(label)) for label in labels])

    full = []
    label_of = model_labels(results)
    for result in results:
        label = label_of[_model_key(result)]
        for metric, value in sorted(result["metrics"].items()):
            if isinstance(value, _SCALARS):
                full.append([_cell(result["dataset"]), _cell(result["task"]), _cell(label),
                             _cell(metric), _cell(value)])

    lines = ["# Benchmark suite", "", f"Main metric: {_metric_title(results)}.", ""]
    lines += _md_table(["dataset", "task", "metric"] + labels, rows)
    lines += ["", "## All metrics", ""]
    lines += _md_table(["dataset", "task", "model", "metric", "value"], full)
    return "\n".join(lines) + "\n"


def write_markdown(results, path) -> Path:
    text = markdown(results)
    return atomic_write(path, lambda f: f.write(text))


def _colours(n: int) -> list:
    """Distinct colours: the qualitative tab10/tab20 maps while they last, then evenly spaced."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def build_figure(results) -> Figure:
    """The bar chart as a Figure: one group per (dataset, task) and a final "average" group, one
    bar per model in each (height 0 and an "n/a" mark where a value is missing, so every group
    has the same bars), a legend naming every model."""
    results = _sorted(results)
    labels = list(dict.fromkeys(model_labels(results).values()))
    table = _main_table(results)
    groups = _groups(results)
    average = suite_average(results)
    columns = [{label: main_metric(table[g][label]) if label in table[g] else None for label in labels}
               for g in groups] + [{label: average.get(label) for label in labels}]
    names = [f"{dataset}\n{_TASK_SHORT.get(task, task)}" for dataset, task in groups] + ["average"]

    n_models, n_groups = max(len(labels), 1), len(names)
    bar = 0.8 / n_models
    group_in = max(0.9, 0.22 * n_models + 0.3)  # inches per group: bars stay visible as models grow
    width = min(_MAX_WIDTH_IN, max(6.0, 1.5 + group_in * n_groups))
    fig = Figure(figsize=(width, 5.5), dpi=_DPI)
    FigureCanvasAgg(fig)  # Agg explicitly: no display needed, and pyplot's global state untouched
    ax = fig.add_subplot()

    for i, (label, colour) in enumerate(zip(labels, _colours(len(labels)))):
        xs = [g + (i - (n_models - 1) / 2) * bar for g in range(n_groups)]
        values = [column[label] for column in columns]
        ax.bar(xs, [0.0 if v is None else v for v in values], width=bar, color=colour, label=label)
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)

    ax.set_xticks(range(n_groups))
    # Rotate only when a label is wider than its group; upright labels are easier to read.
    widest = max(len(line) for name in names for line in name.split("\n"))
    rotate = widest * _TICK_CHAR_IN > group_in * 0.95
    ax.set_xticklabels(names, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                       rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.6, n_groups - 0.4)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("main metric")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if n_groups > 1:
        ax.axvline(n_groups - 1.5, color="grey", linewidth=0.8, linestyle="--")  # sets apart the average
    if labels:  # an empty suite still gets a (blank) chart, without matplotlib's empty-legend warning
        # Outside the axes, so it never covers a bar; savefig's tight bbox makes room for it.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="model")
    wrap = max(60, int(width * 12))
    ax.set_title("\n".join(textwrap.wrap(f"Benchmark suite: {_metric_title(results)}", wrap)),
                 fontsize=10)
    return fig


def write_plot(results, path) -> Path:
    fig = build_figure(results)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"), binary=True)


def write_reports(out_dir, stem: str = "results") -> dict[str, Path]:
    """Read the results in `out_dir` and write <stem>.csv, <stem>.md and <stem>.png beside them."""
    out_dir = Path(out_dir)
    results = read_results(out_dir)
    return {
        "csv": write_csv(results, out_dir / f"{stem}.csv"),
        "md": write_markdown(results, out_dir / f"{stem}.md"),
        "png": write_plot(results, out_dir / f"{stem}.png"),
    }
