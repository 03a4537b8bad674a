"""Zero-shot evaluation: classification and retrieval, with CLIP_benchmark's metric definitions.

Two ways in:
- `evaluate(model_spec, dataset, task)` loads a model from disk (run dir, export dir, or open_clip
  name + local weights) and returns CLIP_benchmark's result shape (zero-shot classification adds
  the prompts and a per-class recall table beside it, see `result_record`); `clip-eval` wraps it.
- `run_training_eval(model, preprocess, tokenizer, ...)` evaluates a model being trained, in
  process, and returns flat `"zeroshot/..."`, `"retrieval/..."`, `"multilabel/..."` metrics for
  the logger. Inside a process group of several ranks every rank must call it: each scores a share
  of the samples (see `sharding`, `parallel`) and all return the same metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from clip_train.eval.datasets import (
    DEFAULT_TEMPLATES,
    ClassificationSource,
    DatasetRequest,
    batch_progress,
    build_classification_set,
    build_retrieval_set,
    make_loader,
    open_classification_set,
    open_retrieval_set,
    resolve_classification_set,
    resolve_retrieval_set,
)
from clip_train.eval.loading import EvalError, LoadedModel, load_model
from clip_train.eval.parallel import evaluate_sharded
from clip_train.eval.prompts import prompt_record
from clip_train.eval.retrieval import zeroshot_retrieval
from clip_train.eval.sharding import current_share, run_collectively
from clip_train.eval.zeroshot import zeroshot_classification
from clip_train.registry import Registry

__all__ = [
    "DEFAULT_TEMPLATES",
    "DatasetRequest",
    "EVAL_TASKS",
    "EvalError",
    "EvalTask",
    "LoadedModel",
    "build_classification_set",
    "build_retrieval_set",
    "evaluate",
    "load_model",
    "make_loader",
    "resolve_device",
    "run_training_eval",
    "zeroshot_classification",
    "zeroshot_retrieval",
]


@dataclass(frozen=True)
class EvalTask:
    """An evaluation in two steps, so that a bad dataset is reported before a model is loaded.

    resolve(DatasetRequest or path, templates file or None) -> a checked description of the data
    (cheap); run(model, preprocess, tokenizer, resolved, batch_size, workers, device, signal_dtype=,
    amp=, **task options) -> metrics dict (see zeroshot.encode_signal for signal_dtype).
    `sharded`: whether run() on one rank scores the whole set (False) or the task splits itself
    over a process group (True: the linear probe); else run_task shards it through `parallel`.
    """

    resolve: Callable[[Any, Any], Any]
    run: Callable[..., dict]
    sharded: bool = False


EVAL_TASKS: Registry[EvalTask] = Registry("eval task")


def _run_classification(model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype=None,
                        amp=False, **_) -> dict:
    loader = make_loader(open_classification_set(source, preprocess), batch_size, workers)
    return zeroshot_classification(model, tokenizer, loader, source.classnames, source.templates, device,
                                   amp=amp, signal_dtype=signal_dtype)


def _run_retrieval(model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype=None, amp=False,
                   **_) -> dict:
    loader = make_loader(open_retrieval_set(source, preprocess), batch_size, workers)
    return zeroshot_retrieval(model, tokenizer, loader, device, amp=amp, signal_dtype=signal_dtype)


def _run_captioning(model, preprocess, tokenizer, source, batch_size, workers, device, **_) -> dict:
    from .captioning import captioning_check

    try:
        return captioning_check(model, preprocess, tokenizer, source, batch_size, workers, device)
    except ValueError as err:
        raise EvalError(str(err)) from None


def _run_multilabel(model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype=None, amp=False,
                    **_) -> dict:
    from .multilabel import open_multilabel_set, zeroshot_multilabel

    loader = make_loader(open_multilabel_set(source, preprocess), batch_size, workers)
    return zeroshot_multilabel(model, tokenizer, loader, source.classnames, source.templates, device,
                               signal_dtype=signal_dtype, amp=amp)


def _resolve_multilabel(dataset, templates=None):
    return resolve_classification_set(dataset, templates, task_kind="multilabel")


def _resolve_probe(dataset, templates=None):
    from .probing import resolve_probe_sets

    return resolve_probe_sets(dataset, templates)


def _run_probe(model, preprocess, tokenizer, sets, batch_size, workers, device, **options) -> dict:
    from .probing import run_linear_probe

    return run_linear_probe(model, preprocess, tokenizer, sets, batch_size, workers, device, **options)


EVAL_TASKS.register("zeroshot_classification")(EvalTask(resolve_classification_set, _run_classification))
EVAL_TASKS.register("zeroshot_retrieval")(EvalTask(resolve_retrieval_set, _run_retrieval))
EVAL_TASKS.register("zeroshot_multilabel")(EvalTask(_resolve_multilabel, _run_multilabel))
EVAL_TASKS.register("linear_probe")(EvalTask(_resolve_probe, _run_probe, sharded=True))
EVAL_TASKS.register("captioning")(EvalTask(resolve_retrieval_set, _run_captioning))


def task_named(name: str) -> EvalTask:
    try:
        return EVAL_TASKS.get(name)
    except KeyError as exc:
        raise EvalError(exc.args[0]) from None


def resolve_device(device: str = "auto") -> str:
    """"auto": this rank's CUDA device when there is one (LOCAL_RANK under torchrun), else "cpu"."""
    if device != "auto":
        return str(device)
    if not torch.cuda.is_available():
        return "cpu"
    import os

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


def run_task(task: str, model, preprocess, tokenizer, resolved, batch_size: int, workers: int, device,
             signal_dtype=None, amp: bool = False, **options) -> dict:
    """Metrics of `task` on already-resolved data. Inside a process group of several ranks every
    rank must call it: each scores its share, and all return the same metrics."""
    eval_task = task_named(task)
    share = current_share()
    if share is None or eval_task.sharded:
        return eval_task.run(model, preprocess, tokenizer, resolved, batch_size, workers, device,
                             signal_dtype=signal_dtype, amp=amp, **options)
    return evaluate_sharded(task, resolved, model, preprocess, tokenizer, batch_size, workers, device, signal_dtype,
                            share, amp=amp)


def resolve_collectively(eval_task: EvalTask, dataset, templates=None):
    """eval_task.resolve on every rank of a process group, failing on all when it fails on one (a
    path one node lacks), so that no rank waits alone in the evaluation's collectives."""
    if current_share() is None:
        return eval_task.resolve(dataset, templates)
    return run_collectively(lambda: eval_task.resolve(dataset, templates))


def is_scalar_metric(value) -> bool:
    """A metric a logger or a table can hold (a number, a string, None), not a detail beside them."""
    return not isinstance(value, (list, tuple, dict))


def result_record(task: str, metrics: dict, dataset: str, model: str, pretrained, resolved=None) -> dict:
    """CLIP_benchmark's result JSON shape; per-sample outputs (generated captions, lists) and
    per-class tables (`per_class_recall`) sit beside the numeric metrics, not among them. For a
    zero-shot classification set (`resolved` a ClassificationSource) the record also names the
    prompts: `templates_source`, `templates`, `classnames` (see `prompts`)."""
    details = {k: metrics.pop(k) for k in [k for k, v in metrics.items() if not is_scalar_metric(v)]}
    record = {"dataset": str(dataset), "model": str(model), "pretrained": pretrained, "task": task,
              "metrics": metrics, "language": "en"}
    if isinstance(resolved, ClassificationSource):
        record.update(prompt_record(resolved.templates_source, resolved.templates, resolved.classnames))
    return {**record, **details}


def evaluate(model_spec, dataset, task, *, pretrained=None, templates=None, batch_size=64, workers=0,
             device="auto", amp=None, **options) -> dict:
    """Load `model_spec`, run `task` on `dataset` (a path or a DatasetRequest); returns
    CLIP_benchmark's JSON shape. `amp` None: autocast on CUDA, full precision on the CPU.
    `options` go to the task (the linear probe's `probe=ProbeOptions(...)`, `feature_cache=`).

    Raises EvalError (one-line message) for a bad request: unknown task, missing dataset or model.
    """
    eval_task = task_named(task)
    resolved = resolve_collectively(eval_task, dataset, templates)  # before the (slow) model load
    device = resolve_device(device)
    amp = device.startswith("cuda") if amp is None else amp
    loaded = load_model(str(model_spec), pretrained=pretrained, device=device)
    if task == "linear_probe":
        options.setdefault("model_name", f"{loaded.name}|{pretrained}")
    with torch.no_grad():
        task_metrics = run_task(task, loaded.model, loaded.preprocess, loaded.tokenizer, resolved, batch_size,
                                workers, device, amp=amp, **options)
    path = dataset.path if isinstance(dataset, DatasetRequest) else dataset
    return result_record(task, task_metrics, str(path), str(model_spec), pretrained, resolved)


# run_training_eval's result prefix -> the task it runs
TRAINING_TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                  "multilabel": "zeroshot_multilabel"}


def run_training_eval(
    model,
    preprocess,
    tokenizer,
    zeroshot_path=None,
    retrieval_path=None,
    device="cpu",
    batch_size=256,
    workers=0,
    signal_dtype=None,
    multilabel_path=None,
    progress: bool = False,
) -> dict:
    """Evaluate a model being trained; returns e.g. {"zeroshot/acc1": ..., "retrieval/
    image_retrieval_recall@1": ..., "multilabel/macro_auroc": ...}. Metrics that are undefined
    (acc5 with fewer than 5 classes) and tasks whose path is None are left out. The model is put in
    eval mode and given back in the mode it came in, gradients off throughout.

    With a process group of W > 1 ranks, EVERY rank must call this with the same arguments (and the
    model's full weights): each rank reads and scores a disjoint share of the samples with
    `workers` loader workers, and all return the same metrics, those of a single-process run.
    `signal_dtype` (e.g. torch.bfloat16, the dtype DeepSpeed cast the towers to) is the dtype the
    signal batch is cast to before encode_image; features are scored in float32 regardless.
    """
    paths = {"zeroshot": zeroshot_path, "retrieval": retrieval_path, "multilabel": multilabel_path}
    was_training = model.training
    model.eval()
    results = {}
    try:
        with torch.no_grad():
            for prefix, path in paths.items():
                if path is None:
                    continue
                task = TRAINING_TASKS[prefix]
                resolved = resolve_collectively(EVAL_TASKS.get(task), path)
                with batch_progress(f"eval {prefix}" if progress else None):
                    task_metrics = run_task(task, model, preprocess, tokenizer, resolved, batch_size, workers,
                                            device, signal_dtype=signal_dtype)
                results.update({f"{prefix}/{k}": v for k, v in task_metrics.items()
                                if v is not None and is_scalar_metric(v)})  # per_class_recall is for the JSON
    finally:
        model.train(was_training)
    return results
