"""Benchmark suites: several models on several datasets, one result JSON per (model, dataset, task).

A suite is planned whole before any model loads: every dataset root is found from the template
(`{dataset}`, `{dataset_cleaned}` = the name with `/` replaced by `-`, as CLIP_benchmark's
--dataset_root), its task decided and its data checked, so a typo in the 30th dataset name fails
in a second, not after hours. Each result is written as soon as it is computed (atomically), under
CLIP_benchmark's file name `{dataset}_{pretrained}_{model}_{language}_{task}.json`; a suite run
again skips the results already there, so an interrupted suite resumes where it stopped. The
CSV, markdown table and plot (`report`) are written from all the result files at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from clip_train.eval import DatasetRequest, EvalError, EVAL_TASKS, load_model, result_record, resolve_collectively, \
    run_task
from clip_train.eval import known_datasets, layouts
from clip_train.eval.atomic import atomic_write
from clip_train.eval.datasets import CLASSNAMES_FILE, batch_progress, find_shards
from clip_train.eval.sharding import is_main_rank

log = logging.getLogger(__name__)

# the tasks each kind of dataset can be evaluated with; the first is its default
TASKS_OF_KIND = {
    "classification": ("zeroshot_classification", "linear_probe"),
    "retrieval": ("zeroshot_retrieval",),
    "multilabel": ("zeroshot_multilabel",),
}
LANGUAGE = "en"


@dataclass(frozen=True)
class SuiteModel:
    spec: str  # run dir, export dir, or open_clip name
    pretrained: str | None = None  # local weights for an open_clip name
    slug: str = ""  # its part of the result file names; set by plan_suite (unique in the suite)


def _path_tail(spec: str, depth: int) -> str:
    parts = Path(spec).parts
    return "_".join(parts[-depth:]) if Path(spec).exists() else spec.replace("/", "_")


def with_slugs(models: list[SuiteModel]) -> list[SuiteModel]:
    """Each model with a file-name slug: a directory by its last folder name, with as many parent
    folders as it takes to tell the suite's models apart (runs/a/export vs runs/b/export)."""
    for depth in range(1, 1 + max(len(Path(m.spec).parts) for m in models)):
        slugs = [_path_tail(m.spec, depth) for m in models]
        keys = list(zip(slugs, [m.pretrained for m in models]))
        if len(set(keys)) == len(keys):
            break
    return [dataclasses.replace(m, slug=slug) for m, slug in zip(models, slugs)]


@dataclass(frozen=True)
class SuiteJob:
    model: SuiteModel
    dataset: str  # the dataset's name in the suite
    task: str
    request: DatasetRequest
    resolved: object = None  # the task's checked data, from planning (read once, whatever the model count)


def parse_model(text: str, pretrained: str | None = None) -> SuiteModel:
    """`SPEC` or CLIP_benchmark's `NAME,WEIGHTS` form."""
    if pretrained is None and "," in text:
        text, pretrained = text.split(",", 1)
    return SuiteModel(text, pretrained or None)


def cleaned(name: str) -> str:
    return name.replace("/", "-")


def dataset_root(template: str, name: str) -> Path:
    if "{dataset}" not in template and "{dataset_cleaned}" not in template:
        raise EvalError(f"--dataset-root {template!r} must contain {{dataset}} or {{dataset_cleaned}}")
    return Path(template.replace("{dataset_cleaned}", cleaned(name)).replace("{dataset}", name))


def dataset_kind(root: Path, name: str, split: str) -> str:
    """classification, retrieval or multilabel: from dataset_type.txt in a CLIP_benchmark layout,
    a Karpathy JSON is retrieval, a known name's own kind, else clip-prep shards without class
    names are retrieval and everything else classification."""
    if root.is_file() and root.suffix == ".json":
        return "retrieval"
    if root.is_dir() and layouts.is_benchmark_root(root, split):
        return layouts.benchmark_dataset_type(root)
    if known_datasets.is_known(name):
        return {"zeroshot_retrieval": "retrieval", "zeroshot_multilabel": "multilabel"}.get(
            known_datasets.default_task(name), "classification")
    shards = find_shards(root)
    if shards and not (shards[0].parent / CLASSNAMES_FILE).is_file():
        return "retrieval"
    return "classification"


def _tasks_for(name: str, kind: str, wanted: list[str] | None) -> list[str]:
    possible = TASKS_OF_KIND[kind]
    if wanted is None:
        return [possible[0]]
    tasks = [t for t in wanted if t in possible]
    if not tasks:
        raise EvalError(f"none of the tasks {', '.join(wanted)} applies to {kind} dataset {name!r} "
                        f"(its tasks: {', '.join(possible)})")
    return tasks


@dataclass(frozen=True)
class SuiteDataset:
    """A dataset entry of a suite: its name, and optionally its own root, tasks and split."""

    name: str
    tasks: tuple[str, ...] | None = None
    root: str | None = None
    split: str | None = None


def read_suite_file(path: Path) -> tuple[list[SuiteDataset], dict]:
    """The datasets of a suite YAML and its top-level settings (dataset_root, tasks, split, ...):

        dataset_root: /data/wds_{dataset_cleaned}
        tasks: [zeroshot_classification]        # optional default for every dataset
        datasets:
          - cifar10
          - {name: imagenet1k, tasks: [zeroshot_classification, linear_probe]}
          - {name: mscoco_captions, root: /data/coco/dataset_coco.json}
    """
    if not path.is_file():
        raise EvalError(f"suite file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EvalError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list):
        raise EvalError(f"{path} needs a 'datasets:' list")
    entries = []
    for item in spec["datasets"]:
        if isinstance(item, str):
            item = {"name": item}
        unknown = set(item) - {"name", "tasks", "root", "split"}
        if "name" not in item or unknown:
            raise EvalError(f"{path}: a dataset entry is a name or {{name, tasks, root, split}}, got {item}")
        tasks = item.get("tasks")
        entries.append(SuiteDataset(str(item["name"]), tuple(tasks) if tasks else None, item.get("root"),
                                    item.get("split")))
    settings = {k: v for k, v in spec.items() if k != "datasets"}
    return entries, settings


def _check_task_names(tasks) -> None:
    for task in tasks or ():
        if task not in EVAL_TASKS.names():
            raise EvalError(f"unknown task {task!r}; tasks: {', '.join(EVAL_TASKS.names())}")


def _missing_root_error(name: str, root: Path) -> EvalError:
    if known_datasets.is_known(name):
        return EvalError(f"dataset {name!r} not found at {root}")
    known = ", ".join(known_datasets.known_names())
    return EvalError(f"unknown dataset {name!r} and {root} does not exist; known datasets: {known}")


def plan_suite(models: list[SuiteModel], datasets: list[SuiteDataset], root_template: str | None,
               tasks: list[str] | None = None, split: str = "test", train_split: str = "train",
               val_split: str | None = None) -> list[SuiteJob]:
    """Every (model, dataset, task) job of the suite, each dataset checked (cheaply) first."""
    _check_task_names(tasks)
    jobs_per_dataset = []
    for entry in datasets:
        _check_task_names(entry.tasks)
        if entry.root is None and root_template is None:
            raise EvalError(f"no --dataset-root template and no root for dataset {entry.name!r}")
        root = Path(entry.root) if entry.root else dataset_root(root_template, entry.name)
        if not root.exists():
            raise _missing_root_error(entry.name, root)
        entry_split = entry.split or split
        name = known_datasets.canonical_name(entry.name) if known_datasets.is_known(entry.name) else None
        request = DatasetRequest(root, split=entry_split, name=name, train_split=train_split, val_split=val_split)
        # A dataset's own task list is taken as written; otherwise its kind picks (or filters) tasks.
        entry_tasks = list(entry.tasks) if entry.tasks else _tasks_for(
            entry.name, dataset_kind(root, entry.name, entry_split), tasks)
        for task in entry_tasks:
            resolved = resolve_collectively(EVAL_TASKS.get(task), request)  # fail now, not after the first model
            jobs_per_dataset.append((entry.name, task, request, resolved))
    return [SuiteJob(model, name, task, request, resolved) for model in with_slugs(models)
            for name, task, request, resolved in jobs_per_dataset]


def _slug(text: str) -> str:
    return text.replace("/", "_")


def result_path(out_dir: Path, job: SuiteJob) -> Path:
    """CLIP_benchmark's default --output, `{dataset}_{pretrained}_{model}_{language}_{task}.json`,
    with its slugs: `/` -> `_` in the dataset, a weights file by its base name, a model directory
    by its `slug`."""
    pretrained = job.model.pretrained
    pretrained_slug = os.path.basename(pretrained) if pretrained and os.path.isfile(pretrained) else str(pretrained)
    model = job.model.slug or _path_tail(job.model.spec, 1)
    return out_dir / f"{_slug(job.dataset)}_{_slug(pretrained_slug)}_{model}_{LANGUAGE}_{job.task}.json"


def write_json_atomically(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2) + "\n"))


def _agreed(pending: list[SuiteJob]) -> list[SuiteJob]:
    """Rank 0's list of pending jobs on every rank: each job is a collective, so the ranks must run
    the same ones even if a result file appears (or a shared disk lags) between their listings."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return pending
    box = [pending]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_job(job: SuiteJob, loaded, batch_size: int, workers: int, device, amp: bool, options: dict,
            signal_dtype=None) -> dict:
    """The result record of one job with an already loaded model (every rank calls it)."""
    if job.task == "linear_probe":
        options = {**options, "model_name": f"{loaded.name}|{job.model.pretrained}"}
    metrics = run_task(job.task, loaded.model, loaded.preprocess, loaded.tokenizer, job.resolved, batch_size,
                       workers, device, signal_dtype=signal_dtype, amp=amp, **options)
    return result_record(job.task, metrics, job.dataset, job.model.spec, job.model.pretrained, job.resolved)


def run_suite(jobs: list[SuiteJob], out_dir: Path, *, batch_size: int = 64, workers: int = 0, device: str = "cpu",
              amp: bool = False, options: dict | None = None, progress: bool = True) -> list[Path]:
    """Run every job whose result file is missing; returns the result paths of all jobs. A model
    is loaded only when one of its jobs is pending."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(options or {})
    options.setdefault("feature_cache", out_dir / "features")
    pending = _agreed([job for job in jobs if not result_path(out_dir, job).is_file()])
    done = len(jobs) - len(pending)
    if done:
        log.info("%d of %d results already in %s: not recomputed", done, len(jobs), out_dir)
    loaded_for = None
    bar = tqdm(pending, desc="suite", unit="result", disable=not progress or not is_main_rank())
    for job in bar:
        bar.set_postfix_str(f"{job.dataset} {job.task}")
        if loaded_for != job.model:
            loaded = load_model(job.model.spec, pretrained=job.model.pretrained, device=device)
            loaded_for = job.model
        with batch_progress(f"{job.dataset} {job.task}" if progress and is_main_rank() else None):
            record = run_job(job, loaded, batch_size, workers, device, amp, options)
        if is_main_rank():
            write_json_atomically(result_path(out_dir, job), record)
    return [result_path(out_dir, job) for job in jobs]


def plan_training_suite(suite_file, model_label: str = "training run") -> list[SuiteJob]:
    """The jobs of a suite file for one in-process model; its settings (dataset_root, tasks, split,
    train_split, val_split) are the file's own."""
    entries, settings = read_suite_file(Path(suite_file))
    return plan_suite([SuiteModel(model_label)], entries, settings.get("dataset_root"), settings.get("tasks"),
                      split=settings.get("split", "test"), train_split=settings.get("train_split", "train"),
                      val_split=settings.get("val_split"))


def run_training_suite(model, preprocess, tokenizer, suite_file, device, batch_size: int, workers: int,
                       signal_dtype=None, out_dir: Path | None = None, model_label: str = "training run") -> dict:
    """The suite of `suite_file` on a model being trained (`eval.suite`), on every rank of the job
    as `clip-eval suite` runs it; returns flat metrics `suite/DATASET/TASK/METRIC` and
    `suite/average`. With `out_dir`, rank 0 also writes the result JSONs and reports there."""
    from clip_train.eval import LoadedModel, report

    jobs = plan_training_suite(suite_file, model_label)
    loaded = LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, name=model_label)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            records = [run_job(job, loaded, batch_size, workers, device, False, {}, signal_dtype) for job in jobs]
    finally:
        model.train(was_training)
    flat = {f"suite/{r['dataset']}/{r['task']}/{name}": value for r in records
            for name, value in r["metrics"].items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    flat["suite/average"] = report.suite_average(records).get(report.model_label(records[0]))
    if out_dir is not None and is_main_rank():
        for job, record in zip(jobs, records):
            write_json_atomically(result_path(out_dir, job), record)
        report.write_reports(out_dir)
    return flat
