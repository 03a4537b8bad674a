"""Zero-shot evaluation: classification and retrieval, with CLIP_benchmark's metric definitions.

Two ways in:
- `evaluate(model_spec, dataset, task)` loads a model from disk (run dir, export dir, or open_clip
  name + local weights) and returns CLIP_benchmark's result shape; `clip-eval` wraps it.
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
    build_classification_set,
    build_retrieval_set,
    make_loader,
    open_classification_set,
    open_retrieval_set,
    resolve_classification_set,
    resolve_retrieval_shards,
)
from clip_train.eval.loading import EvalError, LoadedModel, load_model
from clip_train.eval.parallel import evaluate_sharded
from clip_train.eval.retrieval import zeroshot_retrieval
from clip_train.eval.sharding import current_share
from clip_train.eval.zeroshot import zeroshot_classification
from clip_train.registry import Registry

__all__ = [
    "DEFAULT_TEMPLATES",
    "EVAL_TASKS",
    "EvalError",
    "EvalTask",
    "LoadedModel",
    "build_classification_set",
    "build_retrieval_set",
    "evaluate",
    "load_model",
    "make_loader",
    "run_training_eval",
    "zeroshot_classification",
    "zeroshot_retrieval",
]


@dataclass(frozen=True)
class EvalTask:
    """An evaluation in two steps, so that a bad dataset is reported before a model is loaded.

    resolve(dataset path, templates file or None) -> a checked description of the data (cheap);
    run(model, preprocess, tokenizer, resolved, batch_size, workers, device) -> metrics dict; the
    tasks run_training_eval uses also take `signal_dtype=` (see zeroshot.encode_signal).
    """

    resolve: Callable[[Any, Any], Any]
    run: Callable[..., dict]


EVAL_TASKS: Registry[EvalTask] = Registry("eval task")


def _run_classification(model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype=None) -> dict:
    loader = make_loader(open_classification_set(source, preprocess), batch_size, workers)
    return zeroshot_classification(model, tokenizer, loader, source.classnames, source.templates, device,
                                   signal_dtype=signal_dtype)


def _resolve_retrieval(dataset, templates):
    if templates is not None:
        raise EvalError("--templates applies to zeroshot_classification only")
    return resolve_retrieval_shards(dataset)


def _run_retrieval(model, preprocess, tokenizer, shards, batch_size, workers, device, signal_dtype=None) -> dict:
    loader = make_loader(open_retrieval_set(shards, preprocess), batch_size, workers)
    return zeroshot_retrieval(model, tokenizer, loader, device, signal_dtype=signal_dtype)


def _run_captioning(model, preprocess, tokenizer, shards, batch_size, workers, device) -> dict:
    from .captioning import captioning_check

    try:
        return captioning_check(model, preprocess, tokenizer, shards, batch_size, workers, device)
    except ValueError as err:
        raise EvalError(str(err)) from None


EVAL_TASKS.register("zeroshot_classification")(EvalTask(resolve_classification_set, _run_classification))
EVAL_TASKS.register("zeroshot_retrieval")(EvalTask(_resolve_retrieval, _run_retrieval))
def _run_multilabel(model, preprocess, tokenizer, source, batch_size, workers, device, signal_dtype=None) -> dict:
    from .multilabel import open_multilabel_set, zeroshot_multilabel

    loader = make_loader(open_multilabel_set(source, preprocess), batch_size, workers)
    return zeroshot_multilabel(model, tokenizer, loader, source.classnames, source.templates, device,
                               signal_dtype=signal_dtype)


EVAL_TASKS.register("captioning")(EvalTask(_resolve_retrieval, _run_captioning))
EVAL_TASKS.register("zeroshot_multilabel")(EvalTask(resolve_classification_set, _run_multilabel))


def _task(name: str) -> EvalTask:
    try:
        return EVAL_TASKS.get(name)
    except KeyError as exc:
        raise EvalError(exc.args[0]) from None


def evaluate(model_spec, dataset, task, *, pretrained=None, templates=None, batch_size=64, workers=0, device="cpu") -> dict:
    """Load `model_spec`, run `task` on `dataset`; returns CLIP_benchmark's JSON shape.

    Raises EvalError (one-line message) for a bad request: unknown task, missing dataset or model.
    """
    eval_task = _task(task)
    resolved = eval_task.resolve(dataset, templates)  # before the (slow) model load
    loaded = load_model(str(model_spec), pretrained=pretrained, device=device)
    with torch.no_grad():
        task_metrics = eval_task.run(
            loaded.model, loaded.preprocess, loaded.tokenizer, resolved, batch_size, workers, device
        )
    # Per-sample outputs (generated captions) sit beside the numeric metrics, not among them.
    details = {k: task_metrics.pop(k) for k in [k for k, v in task_metrics.items() if isinstance(v, list)]}
    return {
        "dataset": str(dataset),
        "model": str(model_spec),
        "pretrained": pretrained,
        "task": task,
        "metrics": task_metrics,
        "language": "en",
        **details,
    }


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
    share = current_share()
    was_training = model.training
    model.eval()
    results = {}
    try:
        with torch.no_grad():
            for prefix, path in paths.items():
                if path is None:
                    continue
                task = TRAINING_TASKS[prefix]
                eval_task = EVAL_TASKS.get(task)
                if share is None:
                    resolved = eval_task.resolve(path, None)
                    task_metrics = eval_task.run(model, preprocess, tokenizer, resolved, batch_size, workers, device,
                                                 signal_dtype=signal_dtype)
                else:
                    task_metrics = evaluate_sharded(task, eval_task.resolve, model, preprocess, tokenizer, path,
                                                    batch_size, workers, device, signal_dtype, share)
                results.update({f"{prefix}/{k}": v for k, v in task_metrics.items() if v is not None})
    finally:
        model.train(was_training)
    return results
