"""`clip-eval`: evaluate a model on one dataset, or a whole benchmark suite.

    clip-eval --model RUN_OR_EXPORT_DIR_OR_NAME --dataset ROOT --task TASK --output results.json
        [--pretrained FILE] [--split test] [--dataset-name NAME] [--templates FILE]
        [--labels FILE] [--images DIR] [--batch-size 64] [--workers N] [--device auto] [--no-amp]
        linear_probe: [--train-split train] [--val-split NAME | --val-proportion P] [--fewshot-k -1]
                      [--lp-epochs 10] [--lp-lr 0.1] [--seed 0] [--feature-cache DIR]

    clip-eval suite --model M [--model M2 ...] [--pretrained FILE ...]
        (--datasets NAME[,NAME...] --dataset-root TEMPLATE | --suite FILE.yaml)
        --output DIR [--tasks TASK[,TASK...]] [the options above] [--no-progress]

TASK: zeroshot_classification, zeroshot_retrieval, zeroshot_multilabel, linear_probe, captioning.
ROOT is recognised from its contents: a CLIP_benchmark-layout root (ROOT/{split}/nshards.txt), a
clip-prep shard folder, a class-folder tree, a flat image folder with --labels, or a Karpathy JSON.
Under torchrun or the deepspeed launcher every rank scores its share and rank 0 writes the files.
Zero-shot classification and multilabel results also name the prompts (`templates_source`,
`templates`, `classnames`) and carry `per_class_recall`; see `clip_train.eval.prompts`.
A bad invocation exits with status 2 and one line on stderr, `clip-eval: error: ...`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clip_train.eval import DatasetRequest, EVAL_TASKS, EvalError, evaluate, resolve_device
from clip_train.eval.datasets import batch_progress
from clip_train.eval.sharding import is_main_rank

PROG = "clip-eval"


class UsageError(Exception):
    pass


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; we want exactly one line."""

    def error(self, message):
        raise UsageError(message)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", action="append", default=None, metavar="FILE",
                        help="local weights file for an open_clip model name (once per --model in a suite; "
                             "default: none, the model's own weights)")
    parser.add_argument("--split", default="test",
                        help="the split to evaluate: a CLIP_benchmark split folder or a Karpathy split (default: test)")
    parser.add_argument("--templates", default=None, metavar="FILE",
                        help="prompt templates file, one per line with {c}; overrides the dataset's templates.txt / "
                             "zeroshot_classification_templates.txt and shipped prompts (default: those, else the "
                             "built-in list)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="samples (images, audio, ECG) per batch, an integer >= 1 (default: 64)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="data loader worker processes, an integer >= 0 (default: 0, load in this process)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", default=None,
                        help="no autocast on CUDA (default: autocast on CUDA; the CPU always runs in full precision)")
    probe = parser.add_argument_group("linear probe")
    probe.add_argument("--train-split", default="train",
                       help="the probe's training split, from the same root (default: train)")
    probe.add_argument("--val-split", default=None,
                       help="a validation split for the weight-decay sweep (default: none, see --val-proportion)")
    probe.add_argument("--val-proportion", type=float, default=None, metavar="P",
                       help="else hold out this share (0 < P < 1) of train for the sweep (default: none; without "
                            "either option, weight decay 0)")
    probe.add_argument("--fewshot-k", type=int, default=-1, metavar="K",
                       help="training samples per class, -1 (all) or an integer >= 1 (default: -1)")
    probe.add_argument("--lp-epochs", type=int, default=10, metavar="N",
                       help="epochs of probe training, an integer >= 1 (default: 10)")
    probe.add_argument("--lp-lr", type=float, default=0.1, metavar="LR",
                       help="learning rate of the probe, a float (default: 0.1)")
    probe.add_argument("--seed", type=int, default=0, help="random seed of the probe, an integer (default: 0)")
    probe.add_argument("--feature-cache", default=None, metavar="DIR",
                       help="folder to keep the probe's features in, for reuse (default: none; a suite uses "
                            "OUTPUT/features)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description="Evaluate a model with CLIP_benchmark's metric definitions.")
    parser.add_argument("--model", required=True,
                        help="run directory, export directory, or open_clip model name (required)")
    parser.add_argument("--dataset", required=True, metavar="ROOT",
                        help="dataset root: CLIP_benchmark layout, clip-prep shards, class folders, a flat image "
                             "folder with --labels, or a Karpathy JSON (required)")
    parser.add_argument("--task", required=True, choices=EVAL_TASKS.names(),
                        help=f"what to evaluate: {', '.join(EVAL_TASKS.names())} (required)")
    parser.add_argument("--output", required=True, metavar="FILE", help="where to write the results JSON (required)")
    parser.add_argument("--dataset-name", default=None, metavar="NAME",
                        help="a known dataset (imagenet1k, cifar10, ...): its shipped class names and prompts apply "
                             "where the data has none (default: none)")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="labels file of a flat image folder, as ImageNet val (default: none)")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="image folder of a Karpathy JSON (default: the JSON's folder)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (default: a bar on a terminal)")
    _add_data_options(parser)
    return parser


def build_suite_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=f"{PROG} suite", description="Evaluate models on a benchmark suite.")
    parser.add_argument("--model", action="append", required=True,
                        help="a model (run dir, export dir, open_clip name, or NAME,WEIGHTS); repeat for several "
                             "(required)")
    parser.add_argument("--datasets", default=None, metavar="NAME[,NAME...]",
                        help="comma-separated dataset names (this or --suite is required)")
    parser.add_argument("--dataset-root", default=None, metavar="TEMPLATE",
                        help="root template with {dataset} or {dataset_cleaned} (default: the suite file's "
                             "dataset_root)")
    parser.add_argument("--suite", default=None, metavar="FILE.yaml",
                        help="a suite YAML naming datasets (and tasks, roots) (default: none)")
    parser.add_argument("--tasks", default=None, metavar="TASK[,TASK...]",
                        help=f"comma-separated tasks to run where they apply, of {', '.join(EVAL_TASKS.names())} "
                             "(default: the suite file's, else each dataset's default task)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the result JSONs, results.csv/.md/.png (required)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (default: bars on a terminal)")
    _add_data_options(parser)
    return parser


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.workers < 0:
        raise UsageError("--workers must be 0 or more")
    if args.lp_epochs < 1:
        raise UsageError("--lp-epochs must be at least 1")
    if args.fewshot_k == 0 or args.fewshot_k < -1:
        raise UsageError("--fewshot-k must be -1 (all samples) or at least 1")
    if args.val_split is not None and args.val_proportion is not None:
        raise UsageError("--val-split and --val-proportion are mutually exclusive")


def format_metrics(result: dict) -> str:
    """One readable line: task, dataset, then name=value for each metric ('n/a' if undefined)."""
    values = " ".join(
        f"{name}={'n/a' if value is None else format(value, '.4f') if isinstance(value, float) else value}"
        for name, value in result["metrics"].items()
    )
    return f"{result['task']} on {result['dataset']}: {values}"


def _task_options(args: argparse.Namespace) -> dict:
    from clip_train.eval.probing import ProbeOptions

    probe = ProbeOptions(fewshot_k=args.fewshot_k, lr=args.lp_lr, epochs=args.lp_epochs, batch_size=args.batch_size,
                         seed=args.seed, val_proportion=args.val_proportion)
    options = {"probe": probe}
    if args.feature_cache is not None:
        options["feature_cache"] = Path(args.feature_cache)
    return options


def _start_process_group() -> None:
    """Join the process group that torchrun / the deepspeed launcher describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend)


def _write_json(path: Path, result: dict) -> None:
    from clip_train.eval.suite import write_json_atomically

    write_json_atomically(path, result)


def run_single(argv) -> int:
    args = build_parser().parse_args(argv)
    _check_common(args)
    if not Path(args.dataset).exists():
        raise UsageError(f"dataset not found: {args.dataset}")
    if args.pretrained and len(args.pretrained) > 1:
        raise UsageError("--pretrained is given once for a single model")
    request = DatasetRequest(
        Path(args.dataset), split=args.split, name=args.dataset_name,
        templates=None if args.templates is None else Path(args.templates),
        labels=None if args.labels is None else Path(args.labels),
        images=None if args.images is None else Path(args.images),
        train_split=args.train_split, val_split=args.val_split)
    if args.dataset_name is not None:
        from clip_train.eval.known_datasets import classification_metadata, default_task

        if default_task(args.dataset_name) != "zeroshot_retrieval":
            classification_metadata(args.dataset_name)  # an unknown name fails here, listing the known ones
    _start_process_group()
    with batch_progress(f"{Path(args.dataset).name} {args.task}" if args.progress and is_main_rank() else None):
        result = evaluate(args.model, request, args.task, pretrained=(args.pretrained or [None])[0],
                          batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                          **(_task_options(args) if args.task == "linear_probe" else {}))
    if is_main_rank():
        _write_json(Path(args.output), result)
        print(format_metrics(result))
    return 0


def _suite_models(args) -> list:
    from clip_train.eval.suite import parse_model

    pretrained = args.pretrained or []
    if pretrained and len(pretrained) != len(args.model):
        raise UsageError(f"--pretrained is given {len(pretrained)} times for {len(args.model)} --model: "
                         f"give it once per model, or use --model NAME,WEIGHTS")
    return [parse_model(m, p) for m, p in zip(args.model, pretrained or [None] * len(args.model))]


def _first_table(markdown: str) -> str:
    """The first table of the suite's markdown report (the main metric per dataset and model)."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def run_suite_command(argv) -> int:
    from clip_train.eval import report, suite

    args = build_suite_parser().parse_args(argv)
    _check_common(args)
    entries, settings = ([], {}) if args.suite is None else suite.read_suite_file(Path(args.suite))
    if args.datasets:
        entries += [suite.SuiteDataset(name.strip()) for name in args.datasets.split(",") if name.strip()]
    if not entries:
        raise UsageError("name the datasets with --datasets or --suite")
    template = args.dataset_root or settings.get("dataset_root")
    tasks = args.tasks.split(",") if args.tasks else settings.get("tasks")
    jobs = suite.plan_suite(_suite_models(args), entries, template, tasks, split=args.split,
                            train_split=args.train_split, val_split=args.val_split)
    _start_process_group()
    device = resolve_device(args.device)
    amp = device.startswith("cuda") if args.amp is None else args.amp
    out_dir = Path(args.output)
    suite.run_suite(jobs, out_dir, batch_size=args.batch_size, workers=args.workers, device=device, amp=amp,
                    options=_task_options(args), progress=args.progress)
    if is_main_rank():
        written = report.write_reports(out_dir)
        print(_first_table(Path(written["md"]).read_text(encoding="utf-8")))
        print(f"results: {', '.join(str(p) for p in written.values())}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            if argv[:1] == ["suite"]:
                return run_suite_command(argv[1:])
            return run_single(argv)
        except EvalError as exc:
            raise UsageError(str(exc)) from None
    except UsageError as exc:
        one_line = " ".join(str(exc).split())  # messages quoting other errors may hold newlines
        print(f"{PROG}: error: {one_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
