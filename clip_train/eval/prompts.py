"""The prompts of zero-shot classification: which templates, from where, and how each class fared.

Templates are chosen once per dataset, first found wins (`resolve_templates`):

1. a templates file given to the evaluation (`clip-eval --templates FILE`, `templates_file=`);
2. the dataset's own file beside the data: `templates.txt` or CLIP_benchmark's
   `zeroshot_classification_templates.txt` (a CLIP_benchmark-layout root reads only the latter);
3. the prompts shipped for a known dataset name (`--dataset-name`, a suite's dataset name);
4. `DEFAULT_TEMPLATES`.

A zero-shot result JSON says what was used, beside CLIP_benchmark's keys (`prompt_record`,
`recall_table`): `templates_source`, `templates`, `classnames`, `per_class_recall`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch

from clip_train.eval.loading import EvalError

TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")

# Used when neither --templates nor a templates file beside the data is given: "a photo of a {c}."
# (CLIP's single default prompt) plus a handful of CLIP's ImageNet prompts, which average out
# some of the wording noise of a single prompt.
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a photo of the large {c}.",
    "a photo of the small {c}.",
    "art of the {c}.",
)

# The result JSON's keys that describe the prompts rather than measure anything; report tables skip them.
PROMPT_KEYS = ("templates_source", "templates", "classnames", "per_class_recall")


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_templates(path: Path) -> list[str]:
    """Prompt templates, one per line; each must contain `{c}` where the class name goes."""
    if not path.is_file():
        raise EvalError(f"templates file not found: {path}")
    templates = read_lines(path)
    if not templates:
        raise EvalError(f"templates file is empty: {path}")
    without_slot = [t for t in templates if "{c}" not in t]
    if without_slot:
        raise EvalError(f"template without a {{c}} placeholder in {path}: {without_slot[0]!r}")
    return templates


def resolve_templates(given: Path | None, data_dir: Path, dataset_name: str | None,
                      shipped: Callable[[], tuple[list[str], list[str]] | None],
                      own_files: Sequence[str] = TEMPLATE_FILES) -> tuple[list[str], dict]:
    """(templates, where they came from): the `given` file, else a templates file of `data_dir`,
    else the templates of `shipped()` ((class names, templates) of the known dataset
    `dataset_name`, or None; only called when needed), else the default.

    The source is a small JSON-ready dict: {"kind": "given_file", "path": ...},
    {"kind": "dataset_file", "path": ...}, {"kind": "shipped_metadata", "dataset": NAME} or
    {"kind": "builtin_default"}.
    """
    if given is not None:
        return read_templates(Path(given)), {"kind": "given_file", "path": str(Path(given).absolute())}
    for name in own_files:
        if (data_dir / name).is_file():
            return read_templates(data_dir / name), {"kind": "dataset_file", "path": str((data_dir / name).absolute())}
    metadata = shipped()
    if metadata:
        return list(metadata[1]), {"kind": "shipped_metadata", "dataset": dataset_name}
    return list(DEFAULT_TEMPLATES), {"kind": "builtin_default"}


def class_keys(classnames: Sequence[str]) -> list[str]:
    """A unique key per class: its name, or `NAME [INDEX]` for a name that several classes share
    (ImageNet-1k's CLIP names hold two "missile" and two "sunglasses")."""
    repeated = {name for name, count in Counter(classnames).items() if count > 1}
    return [f"{name} [{i}]" if name in repeated else name for i, name in enumerate(classnames)]


def recall_table(classnames: Sequence[str], positives: torch.Tensor, hits: torch.Tensor) -> dict:
    """{class key: {"recall": found / count, "count": count}} in class order, from (N, C) boolean
    tensors: `positives[i, c]` sample i belongs to class c, `hits[i, c]` it was found as class c.
    Counts are integers and each recall the float64 nearest the exact fraction; a class without
    samples has recall None (undefined, and absent from mean_per_class_recall)."""
    counts = positives.sum(0).tolist()
    found = (positives & hits).sum(0).tolist()
    return {key: {"recall": f / n if n else None, "count": n}
            for key, n, f in zip(class_keys(classnames), counts, found)}


def single_label_recall(classnames: Sequence[str], predictions: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per class: the share of its samples whose top-1 prediction is that class."""
    num_classes = len(classnames)
    positives = torch.nn.functional.one_hot(targets.long(), num_classes).bool()
    hits = torch.nn.functional.one_hot(predictions.long(), num_classes).bool()
    return recall_table(classnames, positives, hits)


def multilabel_recall(classnames: Sequence[str], scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per class: the share of its positive samples that rank it among their top k classes, k the
    sample's number of labels (a threshold-free recall; top-1 recall for single-label samples)."""
    positives = targets > 0.5
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    return recall_table(classnames, positives, rank < positives.sum(1, keepdim=True))


def prompt_record(templates_source: dict | None, templates: Sequence[str], classnames: Sequence[str]) -> dict:
    """The result JSON's description of the zero-shot classifier: its templates, their source and
    the class names, in class-index order."""
    return {"templates_source": templates_source or {"kind": "unknown"}, "templates": list(templates),
            "classnames": list(classnames)}
