"""Shared layout of the audio and ECG demos (same contract as the image demo in demo.py):

    DIR/train/      KEY.<media>, KEY.txt (one caption), KEY.json (with "label" and how the
                    sample was generated)
    DIR/test/       zero-shot set: KEY.<media>, KEY.cls (b"3"), KEY.txt, KEY.json (also
                    "labels": [class indices], for multi-label evaluation), plus
                    classnames.txt and templates.txt ("... {c} ...")
    DIR/retrieval/  the same held-out samples and keys; KEY.txt holds several captions, one per line

Samples are generated in a process pool (results consumed in order, so the output does not
depend on --workers) and encoded by the same encoders as `clip-prep shard`.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from data_prep.demo import SAMPLES_PER_SHARD, prepare_demo_dir
from data_prep.writer import DatasetWriter


@dataclass(frozen=True)
class DemoSize:
    """Samples per class in each split (None: the modality's full demo) and worker processes."""

    train_per_class: int | None = None
    test_per_class: int | None = None
    workers: int = 1


@dataclass
class DemoSample:
    """One generated sample: media members (without txt/json), label, captions (the first is
    the training caption), and metadata for KEY.json."""

    members: dict[str, bytes]
    label: int
    captions: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoSpec:
    """What a modality's demo provides to the shared writer."""

    modality: str
    source_type: str
    classnames: tuple[str, ...]
    zero_shot_templates: tuple[str, ...]
    options: dict[str, Any]


def generate_in_order(make: Callable[[Any], list[DemoSample]], jobs: list, workers: int) -> Iterator[DemoSample]:
    """Run `make` (one job -> a list of samples) over the jobs; samples come out in job order."""
    if workers <= 1 or len(jobs) < 2:
        for samples in map(make, jobs):
            yield from samples
        return
    with multiprocessing.Pool(min(workers, len(jobs))) as pool:
        for samples in pool.imap(make, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
            yield from samples


def _manifest_fields(spec: DemoSpec, split: str) -> dict:
    return {"source_type": spec.source_type, "modality": spec.modality, "split": split, "options": spec.options}


def write_train(out_dir: Path, spec: DemoSpec, samples: Iterable[DemoSample]) -> int:
    writer = DatasetWriter(out_dir / "train", SAMPLES_PER_SHARD)
    count = 0
    for count, sample in enumerate(samples, start=1):
        members = {**sample.members, "txt": sample.captions[0].encode("utf-8")}
        writer.write(count - 1, members, {**sample.metadata, "caption": sample.captions[0], "label": sample.label})
    return writer.finish(count, _manifest_fields(spec, "train")).written


def write_held_out(out_dir: Path, spec: DemoSpec, samples: Iterable[DemoSample]) -> int:
    """The test (zero-shot) and retrieval splits share samples and keys."""
    test = DatasetWriter(out_dir / "test", SAMPLES_PER_SHARD)
    retrieval = DatasetWriter(out_dir / "retrieval", SAMPLES_PER_SHARD)
    count = 0
    for count, sample in enumerate(samples, start=1):
        metadata = {**sample.metadata, "caption": sample.captions[0], "label": sample.label}
        test_members = {**sample.members, "cls": str(sample.label).encode("ascii"),
                        "txt": sample.captions[0].encode("utf-8")}
        test.write(count - 1, test_members, {**metadata, "labels": [sample.label],
                                             "classname": spec.classnames[sample.label]})
        retrieval_members = {**sample.members, "txt": "\n".join(sample.captions).encode("utf-8")}
        retrieval.write(count - 1, retrieval_members, {**metadata, "captions": sample.captions})
    written = test.finish(count, _manifest_fields(spec, "test")).written
    retrieval.finish(count, _manifest_fields(spec, "retrieval"))
    (out_dir / "test" / "classnames.txt").write_text("\n".join(spec.classnames) + "\n", encoding="utf-8")
    (out_dir / "test" / "templates.txt").write_text("\n".join(spec.zero_shot_templates) + "\n", encoding="utf-8")
    return written


def build_signal_demo(modality: str, out_dir: Path, rate: int | None, size: DemoSize, seed: int,
                      overwrite: bool) -> dict[str, int]:
    """Write the audio or ECG demo; returns sample counts per split."""
    if modality == "audio":
        from data_prep import demo_audio as module
    else:
        from data_prep import demo_ecg as module
    plan = module.plan_demo(rate, size, seed)  # checks tools (espeak-ng) before touching out_dir
    prepare_demo_dir(out_dir, overwrite)
    train = write_train(out_dir, plan.spec, generate_in_order(module.make_samples, plan.train_jobs, size.workers))
    test = write_held_out(out_dir, plan.spec, generate_in_order(module.make_samples, plan.test_jobs, size.workers))
    return {"train": train, "test": test, "retrieval": test}


@dataclass
class DemoPlan:
    spec: DemoSpec
    train_jobs: list
    test_jobs: list
