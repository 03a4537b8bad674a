"""Evaluation datasets: webdataset shards written by clip-prep, or a plain image folder.

Shards are read in file order with `shardshuffle=False`, so every run sees the samples in the same
order. Only the members a task needs are read out of the tar (`select_files`); everything else —
pickles (`.pyd`, `.pth`) in particular — is skipped unread and never decoded.

Classification set layout (a shard directory):
    00000.tar ...        members KEY.jpg (or another image, .flac/.wav audio, .npy ECG) and KEY.cls
                         (ASCII class index)
    classnames.txt       one class name per line, in index order (required)
    templates.txt        one prompt per line containing {c} (or CLIP_benchmark's
                         zeroshot_classification_templates.txt); optional, see DEFAULT_TEMPLATES
Or a folder with one sub-folder per class (sorted as torchvision's ImageFolder, `_` read as a
space in the class name).

Retrieval set layout: shards with KEY.jpg (or audio/ECG) and KEY.txt, the .txt holding one or several captions,
one per line (empty lines dropped).

Each `open_*` takes an optional `share` (see `sharding`): inside a multi-rank evaluation it keeps
only this rank's samples and puts each one's global index in front of its example.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from clip_train.data.modalities import MODALITIES
from clip_train.eval.loading import EvalError
from clip_train.eval.sharding import IndexedSubset, Share, collate_indexed, indexed_example, split_stages

MEDIA_EXTENSIONS = tuple(ext for name in MODALITIES.names() for ext in MODALITIES.get(name).extensions)
CLASSNAMES_FILE = "classnames.txt"
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

Transform = Callable[[object], torch.Tensor]  # decoded image/audio/ECG -> model input


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


def find_shards(path: Path) -> list[Path]:
    """The tar shards of a dataset: a single .tar file, or every .tar of a directory, sorted."""
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return []


def _shard_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _is_wanted_member(fname: str, extensions: tuple[str, ...]) -> bool:
    base = fname.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in extensions


def _member_selector(extensions: tuple[str, ...]) -> Callable[[str], bool]:
    """Keeps tar members whose extension (after the first dot of the name, as webdataset groups
    them) is one of `extensions`; all other members are skipped without being read. A partial of a
    module-level function, not a closure: loader workers started by "spawn" must pickle it."""
    return functools.partial(_is_wanted_member, extensions=extensions)


def _shard_pipeline(shards: list[Path], extensions: tuple[str, ...], share: Share | None = None) -> wds.WebDataset:
    """Grouped (undecoded) samples of `shards`; with a share, only this rank's, each tagged with
    its global index."""
    urls = [str(s) for s in shards]
    # Without a share, whoever calls evaluation reads every shard, even inside a distributed job.
    nodesplitter, tag = (None, None) if share is None else split_stages(urls, share)
    pipeline = wds.WebDataset(
        urls,
        shardshuffle=False,  # evaluation order is the file order, run after run
        nodesplitter=nodesplitter,
        workersplitter=wds.split_by_worker,
        select_files=_member_selector(extensions),
        empty_check=False,  # a worker or rank left without a shard is fine; emptiness is checked by the task
    )
    return pipeline if tag is None else pipeline.compose(tag)


def map_examples(pipeline, example: Callable, share: Share | None, collate: Callable | None = None):
    """`pipeline` mapped through `example`; with a share each example leads with its global index
    and the collate function (`collate_fn`, read by make_loader) stacks those indices too."""
    if share is None:
        dataset = pipeline.map(example)
        if collate is not None:
            dataset.collate_fn = collate
        return dataset
    dataset = pipeline.map(functools.partial(indexed_example, example=example))
    dataset.collate_fn = functools.partial(collate_indexed, collate=collate)
    return dataset


def _sample_name(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def decode_media(sample: dict):
    """The sample's image, audio or ECG signal, decoded from the first media member present (see
    ``clip_train.data.modalities``); the model's transform turns it into a tensor."""
    for modality in MODALITIES.names():
        for ext in MODALITIES.get(modality).extensions:
            if ext in sample:
                try:
                    return MODALITIES.get(modality).decode(sample[ext])
                except (OSError, ValueError, RuntimeError) as exc:
                    raise EvalError(f"cannot decode {modality} of sample {_sample_name(sample)}: {exc}") from None
    raise EvalError(f"sample {_sample_name(sample)} has no media member ({'/'.join(MEDIA_EXTENSIONS)})")


def decode_class_index(sample: dict) -> int:
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise EvalError(f"sample {_sample_name(sample)} has no integer .cls member") from None


def decode_captions(sample: dict) -> list[str]:
    """Captions of a sample: the lines of its .txt member, empty lines dropped."""
    if "txt" not in sample:
        raise EvalError(f"sample {_sample_name(sample)} has no .txt member")
    lines = sample["txt"].decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


# Module-level (not lambdas) so that loaders with workers also work under the "spawn" start method.
def _classification_example(sample: dict, transform: Transform) -> tuple[torch.Tensor, int]:
    return transform(decode_media(sample)), decode_class_index(sample)


def _retrieval_example(sample: dict, transform: Transform) -> tuple[torch.Tensor, list[str]]:
    return transform(decode_media(sample)), decode_captions(sample)


def collate_image_captions(batch: list[tuple[torch.Tensor, list[str]]]):
    """Stack the images; keep the captions as a list (one list of captions per image)."""
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


def _resolve_templates(data_dir: Path, templates_file: str | Path | None) -> list[str]:
    if templates_file is not None:
        return read_templates(Path(templates_file))
    for name in TEMPLATE_FILES:
        if (data_dir / name).is_file():
            return read_templates(data_dir / name)
    return list(DEFAULT_TEMPLATES)


@dataclass
class ClassificationSource:
    """A checked classification set, not yet opened: either shards or an image folder."""

    shards: list[Path]  # empty for an image folder
    folder: Path | None  # None for shards
    classnames: list[str]
    templates: list[str]


def _shard_classnames(shards: list[Path]) -> list[str]:
    classnames_path = _shard_dir(shards[0]) / CLASSNAMES_FILE
    if not classnames_path.is_file():
        raise EvalError(f"classification shards need {CLASSNAMES_FILE} beside them: {classnames_path} not found")
    return read_lines(classnames_path)


def _folder_classnames(path: Path) -> list[str]:
    # the sorted sub-folder names, exactly the classes (and order) ImageFolder will use
    classes, _ = find_classes(str(path))
    return [name.replace("_", " ") for name in classes]


def resolve_classification_set(path, templates_file=None) -> ClassificationSource:
    """Check a classification set and read its class names and templates, without opening any
    image; cheap enough to run before loading a model, so a bad request fails fast."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"dataset not found: {path}")
    shards = find_shards(path)
    if shards:
        source = ClassificationSource(shards, None, _shard_classnames(shards), [])
    elif path.is_dir() and any(child.is_dir() for child in path.iterdir()):
        source = ClassificationSource([], path, _folder_classnames(path), [])
    else:
        raise EvalError(f"{path} holds neither .tar shards nor one sub-folder per class")
    if not source.classnames:
        raise EvalError(f"no class names for {path}")
    source.templates = _resolve_templates(_shard_dir(path), templates_file)
    return source


def open_classification_set(source: ClassificationSource, transform: Transform, share: Share | None = None):
    """Dataset yielding (image tensor, class index), or (global index, image, class index) with a
    share; it carries `.classes` (the class names), as CLIP_benchmark's datasets do."""
    if source.shards:
        dataset = map_examples(_shard_pipeline(source.shards, MEDIA_EXTENSIONS + ("cls",), share),
                               functools.partial(_classification_example, transform=transform), share)
    else:
        try:
            dataset = ImageFolder(str(source.folder), transform=transform)
        except (FileNotFoundError, OSError) as exc:
            raise EvalError(f"not a usable image folder: {source.folder}: {exc}") from None
        if share is not None:
            dataset = IndexedSubset(dataset, share)
    dataset.classes = source.classnames
    return dataset


def build_classification_set(path, transform: Transform, templates_file=None):
    """(dataset yielding (image tensor, class index), classnames, templates) for a shard directory
    or an image folder."""
    source = resolve_classification_set(path, templates_file)
    return open_classification_set(source, transform), source.classnames, source.templates


def resolve_retrieval_shards(path) -> list[Path]:
    """The shards of a retrieval set; raises EvalError when there are none."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"dataset not found: {path}")
    shards = find_shards(path)
    if not shards:
        raise EvalError(f"retrieval needs .tar shards; none found in {path}")
    return shards


def open_retrieval_set(shards: list[Path], transform: Transform, share: Share | None = None) -> IterableDataset:
    """Dataset yielding (image tensor, list of captions), led by the global index with a share;
    batches keep a list of caption lists."""
    return map_examples(_shard_pipeline(shards, MEDIA_EXTENSIONS + ("txt",), share),
                        functools.partial(_retrieval_example, transform=transform), share, collate_image_captions)


def build_retrieval_set(path, transform: Transform) -> IterableDataset:
    """Dataset yielding (image tensor, list of captions) from retrieval shards."""
    return open_retrieval_set(resolve_retrieval_shards(path), transform)


def make_loader(dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """A deterministic, unshuffled loader; retrieval sets bring their own collate function."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=getattr(dataset, "collate_fn", None),
    )
