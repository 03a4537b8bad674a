"""Evaluation datasets: clip-prep shards, class folders, and the benchmark layouts of `layouts`.

Shards are read in file order with `shardshuffle=False`, so every run sees the samples in the same
order. Only the members a task needs are read out of the tar (`select_files`); everything else —
pickles (`.pyd`, `.pth`) in particular — is skipped unread and never decoded.

Classification set layout (a shard directory):
    00000.tar ...        members KEY.jpg (or another image, .flac/.wav audio, .npy ECG) and KEY.cls
                         (ASCII class index)
    classnames.txt       one class name per line, in index order (required)
    templates.txt        one prompt per line containing {c} (or CLIP_benchmark's
                         zeroshot_classification_templates.txt); optional, see `prompts`
Or a folder with one sub-folder per class (sorted as torchvision's ImageFolder, `_` read as a
space in the class name).

Retrieval set layout: shards with KEY.jpg (or audio/ECG) and KEY.txt, the .txt holding one or several captions,
one per line (empty lines dropped).

Beside these, `resolve_*` recognise from its contents a CLIP_benchmark-layout root, an ImageNet-style
val folder with a labels file, and a Karpathy-split JSON (see `layouts`). A `DatasetRequest` names
the split to read, and optionally a known dataset (`known_datasets`) whose shipped class names and
prompts apply where the data carries none.

Each `open_*` takes an optional `share` (see `sharding`): inside a multi-rank evaluation it keeps
only this rank's samples and puts each one's global index in front of its example.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from clip_train.data.modalities import MODALITIES
from clip_train.eval import layouts
from clip_train.eval.loading import EvalError
from clip_train.eval.prompts import (  # noqa: F401 - DEFAULT_TEMPLATES, read_templates: names of this module too
    DEFAULT_TEMPLATES,
    TEMPLATE_FILES,
    read_lines,
    read_templates,
    resolve_templates,
)
from clip_train.eval.sharding import IndexedSubset, Share, collate_indexed, indexed_example, split_stages

MEDIA_EXTENSIONS = tuple(ext for name in MODALITIES.names() for ext in MODALITIES.get(name).extensions)
CLASSNAMES_FILE = "classnames.txt"
Transform = Callable[[object], torch.Tensor]  # decoded image/audio/ECG -> model input


@dataclass(frozen=True)
class DatasetRequest:
    """What to evaluate on: a dataset path and how to read it.

    path: shards, a class folder, a CLIP_benchmark-layout root, a flat image folder (with `labels`)
    or a Karpathy JSON (with `images`, else the JSON's folder). split: the CLIP_benchmark split
    folder, or the Karpathy split. name: a known dataset (`known_datasets`), whose class names and
    templates are used where the data has none. templates: a templates file that overrides all.
    """

    path: Path
    split: str = "test"
    name: str | None = None
    templates: Path | None = None
    labels: Path | None = None
    images: Path | None = None
    train_split: str = "train"  # the linear probe's training split
    val_split: str | None = None  # the linear probe's validation split (weight-decay sweep)
    classnames: tuple[str, ...] | None = None  # names to use when the data has none (a probe's train split)


def as_request(dataset, templates_file=None) -> DatasetRequest:
    """A DatasetRequest from a request or a bare path (the split then is "test")."""
    if isinstance(dataset, DatasetRequest):
        return dataset if templates_file is None else dataclasses.replace(dataset, templates=Path(templates_file))
    return DatasetRequest(Path(dataset), templates=None if templates_file is None else Path(templates_file))


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


def _shipped_metadata(name: str | None) -> tuple[list[str], list[str]] | None:
    """(class names, templates) shipped for a known dataset name, or None without a name."""
    if name is None:
        return None
    from clip_train.eval.known_datasets import classification_metadata

    return classification_metadata(name)


def _resolve_templates(request: DatasetRequest, data_dir: Path, own_files=TEMPLATE_FILES) -> tuple[list[str], dict]:
    """(templates, their source): --templates, else a templates file of the dataset, else the
    named dataset's, else the default (see `prompts.resolve_templates`)."""
    return resolve_templates(request.templates, data_dir, request.name, lambda: _shipped_metadata(request.name),
                             own_files)


@dataclass
class ClassificationSource:
    """A checked classification set, not yet opened: shards, an image folder, or (image, class)
    pairs from a labels file; exactly one of the three is set."""

    shards: list[Path]  # empty unless the set is sharded
    folder: Path | None  # a class-folder tree
    classnames: list[str]
    templates: list[str]
    samples: list[tuple[Path, int]] | None = None  # a flat folder with a labels file
    label_member: str = "cls"  # "npy" (a multi-hot vector) in a CLIP_benchmark multilabel set
    media: tuple[str, ...] = MEDIA_EXTENSIONS  # the shard members that may hold the signal
    templates_source: dict | None = None  # where `templates` came from (see prompts.resolve_templates)


def _classnames_file(directory: Path, request: DatasetRequest, what: str) -> list[str]:
    """classnames.txt of `directory`, else the names the request carries, else the named dataset's
    shipped names."""
    path = directory / CLASSNAMES_FILE
    if path.is_file():
        return read_lines(path)
    if request.classnames is not None:
        return list(request.classnames)
    shipped = _shipped_metadata(request.name)
    if shipped is None:
        raise EvalError(f"{what} need {CLASSNAMES_FILE} ({path} not found), or a known dataset name for "
                        f"shipped class names (--dataset-name)")
    return list(shipped[0])


def _wnids_for(name: str | None) -> list[str] | None:
    """ImageNet's WordNet ids for an ImageNet-1k name (its folders and labels files use them)."""
    if name is None or "imagenet1k" not in name:
        return None
    from clip_train.eval.known_datasets import imagenet_wnids

    return imagenet_wnids()


def _shipped_name_of(folder: str, shipped: list[str], wnids: list[str] | None) -> str | None:
    """The shipped class name a class folder stands for: by WordNet id (ImageNet), by class index
    ("0" ... "N-1"), or by name (`_` read as a space, any case); None when it is none of these."""
    if wnids is not None and folder in wnids:
        return shipped[wnids.index(folder)]
    if folder.isdigit() and int(folder) < len(shipped):
        return shipped[int(folder)]
    wanted = folder.replace("_", " ").lower()
    return next((n for n in shipped if n.lower() == wanted), None)


def _folder_classnames(path: Path, name: str | None) -> list[str]:
    """Class names in ImageFolder's order (its sorted sub-folder names). With a known dataset name
    each folder is matched to its shipped class, so the names are right whatever the sort order
    does to the indices ("10" before "2")."""
    classes, _ = find_classes(str(path))
    shipped = _shipped_metadata(name)
    if shipped is None:
        return [c.replace("_", " ") for c in classes]
    wnids = _wnids_for(name)
    names = [_shipped_name_of(folder, shipped[0], wnids) for folder in classes]
    unmatched = [folder for folder, found in zip(classes, names) if found is None]
    if unmatched:
        raise EvalError(f"class folder {unmatched[0]!r} of {path} is none of {name}'s classes (by name, index or "
                        f"WordNet id); {len(unmatched)} of {len(classes)} folders do not match")
    return names


def _benchmark_classification(request: DatasetRequest, task_kind: str) -> ClassificationSource:
    root = request.path
    kind = layouts.benchmark_dataset_type(root)
    if kind == "retrieval":
        raise EvalError(f"{root} is a retrieval set ({layouts.DATASET_TYPE_FILE}); evaluate it with zeroshot_retrieval")
    if kind == "multilabel" and task_kind == "single-label":
        raise EvalError(f"{root} is a multilabel set ({layouts.DATASET_TYPE_FILE}); evaluate it with "
                        f"zeroshot_multilabel")
    shards = layouts.benchmark_shards(root, request.split)
    classnames = _classnames_file(root, request, "CLIP_benchmark-layout classification sets")
    templates, origin = _resolve_templates(request, root, (layouts.BENCHMARK_TEMPLATES_FILE,))
    return ClassificationSource(shards, None, classnames, templates, label_member="npy" if kind == "multilabel" else "cls",
                                media=layouts.BENCHMARK_IMAGE_EXTENSIONS, templates_source=origin)


def _labelled_folder(request: DatasetRequest) -> ClassificationSource:
    folder = request.path
    if not folder.is_dir():
        raise EvalError(f"--labels needs a folder of images: {folder} is not a folder")
    classnames = _classnames_file(folder, request, "a folder with a labels file")
    samples = layouts.read_labels_file(Path(request.labels), folder, classnames, _wnids_for(request.name))
    templates, origin = _resolve_templates(request, folder)
    return ClassificationSource([], None, classnames, templates, samples=samples, templates_source=origin)


def split_request(request: DatasetRequest, split: str) -> DatasetRequest:
    """The request for another split of the same dataset: the split folder of a CLIP_benchmark
    root or a Karpathy split; else `split` as a path when it is one, else a sibling folder named
    `split` (demo_data/test -> demo_data/train)."""
    if request.path.is_file() or layouts.is_benchmark_root(request.path, request.split):
        return dataclasses.replace(request, split=split)
    path = Path(split) if Path(split).exists() else request.path.parent / split
    return dataclasses.replace(request, path=path, split=split)


def resolve_classification_set(dataset, templates_file=None, task_kind: str = "single-label") -> ClassificationSource:
    """Check a classification set and read its class names and templates, without opening any
    image; cheap enough to run before loading a model, so a bad request fails fast.

    `dataset` is a DatasetRequest or a path. `task_kind` "multilabel" also accepts CLIP_benchmark
    multilabel sets (KEY.npy targets)."""
    request = as_request(dataset, templates_file)
    path = request.path
    if not path.exists():
        raise EvalError(f"dataset not found: {path}")
    if request.labels is not None:
        source = _labelled_folder(request)
    elif path.is_dir() and layouts.is_benchmark_root(path, request.split):
        source = _benchmark_classification(request, task_kind)
    elif find_shards(path):
        shards = find_shards(path)
        source = ClassificationSource(shards, None, _classnames_file(_shard_dir(shards[0]), request,
                                                                     "classification shards"), [])
        source.templates, source.templates_source = _resolve_templates(request, _shard_dir(path))
    elif path.is_dir() and any(child.is_dir() for child in path.iterdir()):
        source = ClassificationSource([], path, _folder_classnames(path, request.name), [])
        source.templates, source.templates_source = _resolve_templates(request, path)
    else:
        raise EvalError(f"{path} holds neither .tar shards, a CLIP_benchmark layout ({request.split}/"
                        f"{layouts.NSHARDS_FILE}), nor one sub-folder per class (a flat image folder needs --labels)")
    if not source.classnames:
        raise EvalError(f"no class names for {path}")
    return source


class FileSamples(Dataset):
    """Map-style dataset over (file, target) pairs: item i is (transform(decoded file i), target i).
    Files are decoded as the shard members of their extension are (see `decode_media`)."""

    def __init__(self, samples: list[tuple[Path, object]], transform: Transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        media = {path.suffix.lower().lstrip("."): path.read_bytes(), "__url__": str(path.parent),
                 "__key__": path.stem}
        return self.transform(decode_media(media)), target


def _map_style(dataset: Dataset, share: Share | None, collate: Callable | None = None) -> Dataset:
    """A map-style dataset, restricted to this rank's items (each led by its index) with a share."""
    if share is not None:
        dataset = IndexedSubset(dataset, share)
        dataset.collate_fn = functools.partial(collate_indexed, collate=collate)
    elif collate is not None:
        dataset.collate_fn = collate
    return dataset


def open_classification_set(source: ClassificationSource, transform: Transform, share: Share | None = None):
    """Dataset yielding (image tensor, class index), or (global index, image, class index) with a
    share; it carries `.classes` (the class names), as CLIP_benchmark's datasets do."""
    if source.shards:
        dataset = map_examples(_shard_pipeline(source.shards, source.media + ("cls",), share),
                               functools.partial(_classification_example, transform=transform), share)
    elif source.samples is not None:
        dataset = _map_style(FileSamples(source.samples, transform), share)
    else:
        try:
            dataset = ImageFolder(str(source.folder), transform=transform)
        except (FileNotFoundError, OSError) as exc:
            raise EvalError(f"not a usable image folder: {source.folder}: {exc}") from None
        dataset = _map_style(dataset, share)
    dataset.classes = source.classnames
    return dataset


def build_classification_set(path, transform: Transform, templates_file=None):
    """(dataset yielding (image tensor, class index), classnames, templates) for a shard directory
    or an image folder."""
    source = resolve_classification_set(path, templates_file)
    return open_classification_set(source, transform), source.classnames, source.templates


@dataclass
class RetrievalSource:
    """A checked retrieval set: shards (KEY.txt captions), or (image file, captions) pairs read
    from a Karpathy JSON; exactly one is set."""

    shards: list[Path]
    pairs: list[tuple[Path, list[str]]] | None = None
    media: tuple[str, ...] = MEDIA_EXTENSIONS


def resolve_retrieval_set(dataset, templates_file=None) -> RetrievalSource:
    """Check a retrieval set (see RetrievalSource); raises EvalError when it has no samples."""
    if templates_file is not None:
        raise EvalError("--templates applies to classification tasks only")
    request = as_request(dataset)
    path = request.path
    if not path.exists():
        raise EvalError(f"dataset not found: {path}")
    if path.is_file() and path.suffix == ".json":
        images = Path(request.images) if request.images is not None else path.parent
        return RetrievalSource([], layouts.read_karpathy(path, images, request.split))
    if path.is_dir() and layouts.is_benchmark_root(path, request.split):
        kind = layouts.benchmark_dataset_type(path)
        if kind != "retrieval":
            raise EvalError(f"{path} is a {kind} set: a CLIP_benchmark retrieval set has "
                            f"{layouts.DATASET_TYPE_FILE} saying 'retrieval'")
        return RetrievalSource(layouts.benchmark_shards(path, request.split), media=layouts.BENCHMARK_IMAGE_EXTENSIONS)
    shards = find_shards(path)
    if not shards:
        raise EvalError(f"retrieval needs .tar shards, a CLIP_benchmark layout or a Karpathy JSON; none found in {path}")
    return RetrievalSource(shards)


def open_retrieval_set(source, transform: Transform, share: Share | None = None):
    """Dataset yielding (image tensor, list of captions), led by the global index with a share;
    batches keep a list of caption lists. `source` is a RetrievalSource or a list of shards."""
    if not isinstance(source, RetrievalSource):
        source = RetrievalSource(list(source))
    if source.pairs is not None:
        return _map_style(FileSamples(source.pairs, transform), share, collate_image_captions)
    return map_examples(_shard_pipeline(source.shards, source.media + ("txt",), share),
                        functools.partial(_retrieval_example, transform=transform), share, collate_image_captions)


def build_retrieval_set(path, transform: Transform):
    """Dataset yielding (image tensor, list of captions) from a retrieval set."""
    return open_retrieval_set(resolve_retrieval_set(path), transform)


# The description of the batch progress bar to show, or None for none (set by `batch_progress`).
_BATCH_PROGRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("batch_progress", default=None)


@contextlib.contextmanager
def batch_progress(description: str | None):
    """Within this block, `batches` shows a progress bar (on stderr) labelled `description`."""
    token = _BATCH_PROGRESS.set(description)
    try:
        yield
    finally:
        _BATCH_PROGRESS.reset(token)


def batches(loader):
    """The loader, wrapped in a progress bar inside a `batch_progress` block."""
    description = _BATCH_PROGRESS.get()
    if description is None:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=description, unit="batch", leave=False, disable=None)  # None: off unless a terminal


def make_loader(dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """A deterministic, unshuffled loader; retrieval sets bring their own collate function."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=getattr(dataset, "collate_fn", None),
    )
