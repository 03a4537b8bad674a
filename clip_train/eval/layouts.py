"""The on-disk layouts of benchmark datasets that are not `clip-prep` shards or class folders.

CLIP_benchmark's webdataset layout (the mirrors most CLIP papers evaluate from):
    ROOT/{split}/nshards.txt      the number N of shards of the split
    ROOT/{split}/0.tar ... N-1.tar members KEY.webp|png|jpg|jpeg and KEY.cls (class index),
                                  KEY.npy (multi-hot vector) or KEY.txt (captions, one per line)
    ROOT/classnames.txt           classification: one class name per line, in index order
    ROOT/zeroshot_classification_templates.txt   one prompt per line, with {c}
    ROOT/dataset_type.txt         "retrieval" or "multilabel"; absent means classification

An ImageNet-style validation folder: every image in one flat folder, with a labels file giving
each image's class (see `read_labels_file`).

A Karpathy-split JSON (MSCOCO, Flickr30k): `images[].filename` (with an optional
`images[].filepath` sub-folder), `images[].split`, `images[].sentences[].raw`, beside an image folder.

Everything here only reads small metadata files, so a bad dataset is reported before a model loads.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from clip_train.eval.loading import EvalError

NSHARDS_FILE = "nshards.txt"
BENCHMARK_TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
DATASET_TYPES = ("classification", "retrieval", "multilabel")
BENCHMARK_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # the members CLIP_benchmark reads
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".JPEG")


# --- CLIP_benchmark's webdataset layout --------------------------------------------------------------


def is_benchmark_root(root: Path, split: str) -> bool:
    """Whether `root` is laid out as CLIP_benchmark's webdataset sets are: a split folder with
    nshards.txt or .tar shards, or the layout's own metadata files without shards at the top."""
    split_dir = root / split
    if split_dir.is_dir() and ((split_dir / NSHARDS_FILE).is_file() or any(split_dir.glob("*.tar"))):
        return True
    has_own_metadata = (root / DATASET_TYPE_FILE).is_file() or any(root.glob(f"*/{NSHARDS_FILE}"))
    return root.is_dir() and has_own_metadata and not any(root.glob("*.tar"))


def benchmark_splits(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob(f"*/{NSHARDS_FILE}"))


def _read_shard_count(path: Path) -> int:
    text = path.read_text(encoding="utf-8").strip()
    try:
        count = int(text)
    except ValueError:
        raise EvalError(f"{path} must hold the number of shards, found {text[:40]!r}") from None
    if count < 1:
        raise EvalError(f"{path} says {count} shards; a split needs at least one")
    return count


def benchmark_shards(root: Path, split: str) -> list[Path]:
    """The shards 0.tar ... N-1.tar of `split`, in numeric order (10.tar after 9.tar), after
    checking that exactly the N shards that nshards.txt announces are there."""
    split_dir = root / split
    nshards_path = split_dir / NSHARDS_FILE
    if not nshards_path.is_file():
        found = benchmark_splits(root)
        hint = f" (splits with one here: {', '.join(found)})" if found else ""
        raise EvalError(f"{nshards_path} not found: a CLIP_benchmark-layout split needs its nshards.txt{hint}")
    count = _read_shard_count(nshards_path)
    expected = [split_dir / f"{i}.tar" for i in range(count)]
    missing = [p.name for p in expected if not p.is_file()]
    extra = sorted({p.name for p in split_dir.glob("*.tar")} - {p.name for p in expected})
    if missing or extra:
        problem = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise EvalError(f"{nshards_path} says {count} shards but {split_dir} holds "
                        f"{len(list(split_dir.glob('*.tar')))} .tar files ({problem})")
    return expected


def benchmark_dataset_type(root: Path) -> str:
    """classification (no dataset_type.txt), retrieval or multilabel."""
    path = root / DATASET_TYPE_FILE
    if not path.is_file():
        return "classification"
    kind = path.read_text(encoding="utf-8").strip().lower()
    if kind not in DATASET_TYPES:
        raise EvalError(f"{path} says {kind!r}; expected one of {', '.join(DATASET_TYPES)}")
    return kind


# --- an ImageNet-style validation folder with a labels file -------------------------------------------


def _label_index(token: str, classnames: list[str], wnids: list[str] | None, where: str) -> int:
    """A label token as a class index: an integer index, a WordNet id, or a class name."""
    if token.lstrip("-").isdigit():
        index = int(token)
    elif wnids is not None and token in wnids:
        index = wnids.index(token)
    elif token in classnames or token.replace("_", " ") in classnames:
        index = classnames.index(token if token in classnames else token.replace("_", " "))
    else:
        raise EvalError(f"{where}: label {token!r} is neither a class index, a WordNet id nor a class name")
    if not 0 <= index < len(classnames):
        raise EvalError(f"{where}: class index {index} out of range for {len(classnames)} class names")
    return index


def _label_rows(path: Path) -> list[tuple[str, str]]:
    """(image name, label token) rows of a labels file: "NAME LABEL" or "NAME,LABEL" lines, or a
    CSV with a header such as Kaggle's LOC_val_solution.csv (ImageId,PredictionString), whose
    label is the first token of the second column."""
    text = path.read_text(encoding="utf-8")
    delimiter = "," if "," in text.splitlines()[0] else None
    rows = []
    lines = list(csv.reader(text.splitlines())) if delimiter else [line.split() for line in text.splitlines()]
    for fields in lines:
        fields = [f.strip() for f in fields if f.strip()]
        if not fields:
            continue
        if len(fields) < 2:
            raise EvalError(f"{path}: expected 'IMAGE LABEL' on every line, found {' '.join(fields)!r} "
                            f"(a file of bare labels cannot be matched to images)")
        rows.append((fields[0], fields[1].split()[0]))
    if rows and rows[0][0].lower() in ("imageid", "image", "filename", "file", "path"):
        rows = rows[1:]  # a CSV header
    if not rows:
        raise EvalError(f"labels file is empty: {path}")
    return rows


def read_labels_file(path: Path, folder: Path, classnames: list[str], wnids: list[str] | None = None
                     ) -> list[tuple[Path, int]]:
    """(image path, class index) for every image of `folder`, in sorted file-name order.

    Images are matched by file name or by stem (LOC_val_solution.csv names images without their
    extension). Every image must have a label and every label an image: nothing is silently left out.
    """
    if not path.is_file():
        raise EvalError(f"labels file not found: {path}")
    images = {p.name: p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES or p.suffix.lower() in IMAGE_SUFFIXES}
    by_stem = {p.stem: p for p in images.values()}
    labelled: dict[Path, int] = {}
    for line_no, (name, token) in enumerate(_label_rows(path), start=1):
        image = images.get(name) or by_stem.get(name)
        if image is None:
            raise EvalError(f"{path}: image {name!r} (entry {line_no}) is not in {folder}")
        labelled[image] = _label_index(token, classnames, wnids, f"{path} entry {line_no}")
    unlabelled = sorted(set(images.values()) - set(labelled))
    if unlabelled:
        raise EvalError(f"{len(unlabelled)} images of {folder} have no label in {path}, e.g. {unlabelled[0].name}")
    return sorted(labelled.items(), key=lambda item: item[0].name)


# --- a Karpathy-split JSON ---------------------------------------------------------------------------


def _karpathy_image_path(entry: dict, images: Path) -> Path:
    nested = images / entry.get("filepath", "") / entry["filename"]
    return nested if nested.is_file() else images / entry["filename"]


def read_karpathy(path: Path, images: Path, split: str) -> list[tuple[Path, list[str]]]:
    """(image path, its captions) of every image of `split` in a Karpathy JSON, in file order."""
    if not path.is_file():
        raise EvalError(f"Karpathy JSON not found: {path}")
    if not images.is_dir():
        raise EvalError(f"image folder of {path.name} not found: {images}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
        chosen = [(e, [s["raw"].strip() for s in e["sentences"]]) for e in entries if e["split"] == split]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{path} is not a Karpathy-split JSON (images[].filename/split/sentences[].raw): "
                        f"{type(exc).__name__}: {exc}") from None
    if not chosen:
        splits = sorted({e.get("split", "?") for e in entries})
        raise EvalError(f"{path} has no image of split {split!r} (splits: {', '.join(splits)})")
    samples = [(_karpathy_image_path(e, images), captions) for e, captions in chosen]
    missing = [p for p, _ in samples if not p.is_file()]
    if missing:
        raise EvalError(f"{len(missing)} images of {path.name} are not in {images}, e.g. {missing[0]}")
    return samples
