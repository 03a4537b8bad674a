"""`clip-prep benchmark-set`: write a labelled image folder, a (path, label) CSV, a Karpathy
caption split or a set of `clip-prep` shards in the webdataset layout that CLIP_benchmark reads (`build_wds_dataset`):

    ROOT/{split}/0.tar ... N-1.tar   KEY.webp + KEY.cls (class index) | KEY.txt (captions, one a line)
    ROOT/{split}/nshards.txt         N, written last: a crashed run is never read as a complete set
    ROOT/{split}/rejected.jsonl      one line per input that was not written, with the reason
    ROOT/classnames.txt              classification: one name a line, in class-index order
    ROOT/zeroshot_classification_templates.txt   classification: one prompt a line, with {c}
    ROOT/dataset_type.txt            "retrieval" for caption sets; absent for classification

Keys are s0000000, s0000001, ... over the samples written to a split, as CLIP_benchmark's
webdataset_builder numbers them. Images are decoded the way torchvision's loaders do it
(`convert("RGB")`, no resizing, no EXIF rotation), so scores on the converted set are the scores
on the original files, and stored as lossless WEBP, webdataset_builder's default format.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import webdataset as wds

from data_prep.images import DEFAULT_MAX_PIXELS, decode_image
from data_prep.pipeline import encode_in_order
from data_prep.samples import Rejection, read_media_bytes
from data_prep.sources import resolve_media_path
from data_prep.writer import InvariantError

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
REJECTED_FILE = "rejected.jsonl"
KEY_FORMAT = "s%07d"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
CLASSIFICATION, RETRIEVAL = "classification", "retrieval"
_OUR_SPLIT_FILE = re.compile(r"^(\d+\.tar|rejected\.jsonl)$")
_INTEGER = re.compile(r"[+-]?\d+")


class BenchmarkSetError(ValueError):
    """The conversion cannot be done as asked; the message is one line for the user."""


Target = Union[int, tuple[str, ...]]  # a class index, or the captions of a retrieval image


@dataclass(frozen=True)
class Entry:
    """One input image. `source` is how the user named it (CSV cell, path inside the folder,
    Karpathy filename); a source that already knows the input is bad sets `rejection`."""

    source: str
    path: Path
    target: Target
    rejection: Rejection | None = None
    data: bytes | None = None  # the image's bytes when it comes out of a shard, not a file


@dataclass(frozen=True)
class BenchmarkSet:
    """Everything one split needs: its inputs in output order, and the ROOT metadata."""

    kind: str  # CLASSIFICATION or RETRIEVAL
    entries: list[Entry]
    classnames: list[str] | None = None
    templates: list[str] | None = None

    def metadata_files(self) -> dict[str, list[str]]:
        """ROOT files by name, as lists of lines (what CLIP_benchmark reads back, line-stripped)."""
        if self.kind == RETRIEVAL:
            return {DATASET_TYPE_FILE: [RETRIEVAL]}
        return {CLASSNAMES_FILE: self.classnames, TEMPLATES_FILE: self.templates}


@dataclass(frozen=True)
class ClassMetadata:
    """Where class names and templates come from, besides the input itself. `root` is the
    output ROOT: a split added to it inherits the names and templates its splits share."""

    classnames_file: Path | None = None
    templates_file: Path | None = None
    dataset_name: str | None = None
    root: Path | None = None


@dataclass(frozen=True)
class Destination:
    root: Path
    split: str = "test"
    samples_per_shard: int = 1000
    overwrite: bool = False

    @property
    def split_dir(self) -> Path:
        return self.root / self.split


@dataclass(frozen=True)
class ConversionSummary:
    written: int
    rejected: int
    shards: int
    split_dir: Path

    def one_line(self) -> str:
        return (
            f"clip-prep: wrote {_count(self.written, 'sample')} in {_count(self.shards, 'shard')} to {self.split_dir}; "
            f"rejected {self.rejected} (see {self.split_dir / REJECTED_FILE})"
        )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


# ---------------------------------------------------------------- class names and templates


def _require_file(path: Path, flag: str) -> None:
    if not path.is_file():
        raise BenchmarkSetError(f"{flag} {str(path)!r} does not exist or is not a file")


def _read_text(path: Path, flag: str) -> str:
    _require_file(path, flag)
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise BenchmarkSetError(f"cannot read {flag} {str(path)!r}: {error}") from None


def check_classnames(names: list[str], where: str) -> list[str]:
    """Names as CLIP_benchmark will read them back: stripped, non-empty, single-line, unique."""
    names = [name.strip() for name in names]
    for index, name in enumerate(names):
        if not name:
            raise BenchmarkSetError(f"{where}: class {index} has an empty name")
        if len(name.splitlines()) != 1:
            raise BenchmarkSetError(f"{where}: class name {name!r} contains a line break")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchmarkSetError(f"{where}: class name(s) listed twice: {', '.join(map(repr, duplicates))}")
    return names


def check_templates(templates: list[str], where: str) -> list[str]:
    """Every template must be one line that CLIP_benchmark can fill with `.format(c=name)`."""
    templates = [template.strip() for template in templates]
    if not templates:
        raise BenchmarkSetError(f"{where}: no templates")
    marker = "\0"  # "{{c}}" contains the text {c} but formats to a literal; only a real field counts
    for template in templates:
        try:
            filled = template.format(c=marker)
        except (KeyError, IndexError, ValueError) as error:
            raise BenchmarkSetError(f"{where}: template {template!r} cannot be filled: {error!r}") from None
        if marker not in filled or len(template.splitlines()) != 1:
            raise BenchmarkSetError(f"{where}: template {template!r} has no {{c}} for the class name")
    return templates


def read_classnames_file(path: Path) -> list[str]:
    lines = _read_text(path, "--classnames").splitlines()
    while lines and not lines[-1].strip():  # a trailing newline is not a class; a blank inside is
        lines.pop()
    return check_classnames(lines, f"--classnames {path}")


def read_templates_file(path: Path) -> list[str]:
    # Blank lines carry no meaning in a template list, but CLIP_benchmark would read them as
    # empty prompts, so they are dropped rather than written.
    lines = [line for line in _read_text(path, "--templates").splitlines() if line.strip()]
    return check_templates(lines, f"--templates {path}")


def dataset_metadata(name: str) -> tuple[list[str], list[str]]:
    # Imported here: the eval package is only needed when --dataset-name is used.
    from clip_train.eval.known_datasets import classification_metadata
    from clip_train.eval.loading import EvalError

    try:
        classnames, templates = classification_metadata(name)
    except EvalError as error:
        raise BenchmarkSetError(f"--dataset-name: {error}") from None
    where = f"--dataset-name {name}"
    return check_classnames(classnames, where), check_templates(templates, where)


def root_metadata(root: Path | None) -> tuple[list[str] | None, list[str] | None]:
    """The class names and templates an existing ROOT already holds (None where absent)."""
    found = []
    for name, check in ((CLASSNAMES_FILE, check_classnames), (TEMPLATES_FILE, check_templates)):
        path = root / name if root is not None else None
        found.append(check(_read_text(path, "--out").splitlines(), str(path)) if path and path.is_file() else None)
    return found[0], found[1]


def given_metadata(meta: ClassMetadata) -> tuple[list[str] | None, list[str]]:
    """(class names, or None when the input must name the classes; templates).

    First given wins: --classnames / --templates, then --dataset-name, then what ROOT already
    holds (so a train split added after test, say, agrees with it without repeating the flags;
    a split whose labels name only some classes would otherwise imply other names), then the
    input's own names and the default template."""
    from_dataset = dataset_metadata(meta.dataset_name) if meta.dataset_name else (None, None)
    from_root = root_metadata(meta.root)
    classnames = read_classnames_file(meta.classnames_file) if meta.classnames_file else None
    templates = read_templates_file(meta.templates_file) if meta.templates_file else None
    classnames = classnames or from_dataset[0] or from_root[0]
    templates = templates or from_dataset[1] or from_root[1] or list(DEFAULT_TEMPLATES)
    return classnames, templates


# ---------------------------------------------------------------- sources


def _visible(name: str) -> bool:
    # Hidden entries (.DS_Store, .ipynb_checkpoints) are tool litter, not classes or images.
    return not name.startswith(".")


def _files_below(folder: Path) -> Iterator[Path]:
    """Every visible file under `folder`, in sorted walk order (torchvision's ImageFolder order)."""
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(name for name in dirs if _visible(name))
        for name in sorted(files):
            if _visible(name):
                yield Path(current) / name


def from_folder(folder: Path, meta: ClassMetadata, exclude: Path | None = None) -> BenchmarkSet:
    """One sub-folder per class; class index = position in the sorted sub-folder names.

    Every file below a class folder is an input (one that is not an image is rejected when read);
    a file directly in `folder` belongs to no class and is rejected."""
    if not folder.is_dir():
        raise BenchmarkSetError(f"--from-folder {str(folder)!r} does not exist or is not a folder")
    if exclude is not None and (exclude.resolve() == folder.resolve() or folder.resolve() in exclude.resolve().parents):
        raise BenchmarkSetError("--out must not be inside --from-folder: it would be read as a class")
    class_dirs = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and _visible(entry.name))
    if not class_dirs:
        raise BenchmarkSetError(f"--from-folder {str(folder)!r} has no class sub-folders")
    classnames, templates = given_metadata(meta)
    if classnames is None:
        classnames = check_classnames([name.replace("_", " ") for name in class_dirs], f"folder names in {folder}")
    elif len(classnames) != len(class_dirs):
        raise BenchmarkSetError(
            f"{len(classnames)} class names (from --classnames, --dataset-name or ROOT's {CLASSNAMES_FILE}) "
            f"but {folder} has {len(class_dirs)} class folders"
        )
    outside = Rejection("not_in_class_folder", "the file is not inside a class folder")
    # -1: such a file has no class; it is rejected before its label could be written.
    loose = [path for path in sorted(folder.iterdir()) if path.is_file() and _visible(path.name)]
    entries = [Entry(path.name, path, -1, outside) for path in loose]
    for label, name in enumerate(class_dirs):
        entries += [Entry(path.relative_to(folder).as_posix(), path, label) for path in _files_below(folder / name)]
    if not entries:
        raise BenchmarkSetError(f"--from-folder {str(folder)!r}: its class folders hold no files")
    return BenchmarkSet(CLASSIFICATION, entries, classnames, templates)


def _read_csv_rows(path: Path, path_column: str, label_column: str) -> list[tuple[str, str, str]]:
    """(where, path cell, label cell) per row; `where` names the row as "FILE line N"."""
    _require_file(path, "--from-csv")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as table:
            reader = csv.DictReader(table)
            present = reader.fieldnames or []
            for column, flag in ((path_column, "--path-column"), (label_column, "--label-column")):
                if column not in present:
                    raise BenchmarkSetError(
                        f"{path}: no column {column!r} ({flag}); columns: {', '.join(map(repr, present)) or 'none'}"
                    )
            for row in reader:
                where = f"{path.name} line {reader.line_num}"
                cells = (row.get(path_column), row.get(label_column))
                if any(cell is None or not cell.strip() for cell in cells):
                    raise BenchmarkSetError(f"{where}: empty {path_column!r} or {label_column!r}")
                rows.append((where, cells[0], cells[1].strip()))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BenchmarkSetError(f"cannot read --from-csv {str(path)!r}: {error}") from None
    return rows


def _labels_from_indices(rows, classnames: list[str] | None) -> list[int]:
    if classnames is None:
        raise BenchmarkSetError("the labels are class indices: name the classes with --classnames or --dataset-name")
    labels = []
    for where, _, cell in rows:
        label = int(cell)
        if not 0 <= label < len(classnames):
            raise BenchmarkSetError(f"{where}: label {label} is out of range for {len(classnames)} classes")
        labels.append(label)
    return labels


def _labels_from_names(rows, classnames: list[str]) -> list[int]:
    index = {name: position for position, name in enumerate(classnames)}
    labels = []
    for where, _, cell in rows:
        if cell not in index:
            raise BenchmarkSetError(f"{where}: label {cell!r} is not one of the {len(classnames)} class names")
        labels.append(index[cell])
    return labels


def from_csv(path: Path, path_column: str, label_column: str, meta: ClassMetadata) -> BenchmarkSet:
    """Rows of (image path, label). A label column of integers holds class indices; any other
    holds class names (the classes are then their sorted unique names unless names are given).
    Relative image paths resolve against the CSV's own folder."""
    rows = _read_csv_rows(path, path_column, label_column)
    if not rows:
        raise BenchmarkSetError(f"--from-csv {str(path)!r} has no rows")
    classnames, templates = given_metadata(meta)
    if all(_INTEGER.fullmatch(cell) for _, _, cell in rows):
        labels = _labels_from_indices(rows, classnames)
    else:
        if classnames is None:
            classnames = check_classnames(sorted({cell for _, _, cell in rows}), f"labels of {path}")
        labels = _labels_from_names(rows, classnames)
    entries = [
        Entry(cell, resolve_media_path(cell.strip(), path.parent), label) for (_, cell, _), label in zip(rows, labels)
    ]
    return BenchmarkSet(CLASSIFICATION, entries, classnames, templates)


def _load_karpathy(path: Path) -> list:
    text = _read_text(path, "--from-karpathy")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchmarkSetError(f"--from-karpathy {str(path)!r} is not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise BenchmarkSetError(f"--from-karpathy {str(path)!r} has no \"images\" list")
    return document["images"]


def _karpathy_captions(record: dict, where: str) -> tuple[str, ...]:
    sentences = record.get("sentences")
    if not isinstance(sentences, list) or not all(
        isinstance(sentence, dict) and isinstance(sentence.get("raw"), str) for sentence in sentences
    ):
        raise BenchmarkSetError(f"{where}: \"sentences\" must be a list of {{\"raw\": text}}")
    # CLIP_benchmark splits KEY.txt with str.splitlines, so a caption must hold no line break
    # of any kind or it would come back as two captions.
    return tuple(" ".join(sentence["raw"].splitlines()).strip() for sentence in sentences)


def _karpathy_entry(record: dict, where: str, images: Path) -> Entry:
    filename, subfolder = record.get("filename"), record.get("filepath")
    if not isinstance(filename, str) or not filename or not (subfolder is None or isinstance(subfolder, str)):
        raise BenchmarkSetError(f"{where}: needs a \"filename\" (and an optional \"filepath\") string")
    captions = _karpathy_captions(record, where)
    # COCO's JSON names a sub-folder (val2014/...); many copies keep all images in one folder.
    nested = images / subfolder / filename if subfolder else None
    path, source = (nested, f"{subfolder}/{filename}") if nested and nested.is_file() else (images / filename, filename)
    rejection = None
    if not captions:
        rejection = Rejection("no_captions", f"{where}: the image has no sentences")
    elif not all(captions):
        rejection = Rejection("empty_caption", f"{where}: a sentence is empty")
    return Entry(source, path, captions, rejection)


def from_karpathy(path: Path, images: Path, split: str) -> BenchmarkSet:
    """The images of one Karpathy split (MSCOCO / Flickr30k caption JSON), with their raw captions."""
    records = _load_karpathy(path)
    if not images.is_dir():
        raise BenchmarkSetError(f"--images {str(images)!r} does not exist or is not a folder")
    entries, splits = [], set()
    for position, record in enumerate(records):
        where = f"{path.name} images[{position}]"
        if not isinstance(record, dict):
            raise BenchmarkSetError(f"{where} is not an object")
        splits.add(str(record.get("split")))
        if record.get("split") == split:
            entries.append(_karpathy_entry(record, where, images))
    if not entries:
        raise BenchmarkSetError(
            f"no image of {path.name} has split {split!r}; splits present: {', '.join(sorted(splits)) or 'none'}"
        )
    return BenchmarkSet(RETRIEVAL, entries)


# ---------------------------------------------------------------- writing


SHARD_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
SHARD_TEMPLATE_FILES = ("templates.txt", TEMPLATES_FILE)


def _shard_samples(shards: list[Path]) -> Iterator[tuple[str, dict]]:
    """(shard:key, members) of every sample, in shard and file order; members stay undecoded."""
    for shard in shards:
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            yield f"{shard.name}:{sample['__key__']}", sample


def _shard_entry(where: str, sample: dict, kind: str, num_classes: int) -> Entry:
    image_ext = next((ext for ext in SHARD_IMAGE_MEMBERS if ext in sample), None)
    data = sample[image_ext] if image_ext else None
    if kind == RETRIEVAL:
        captions = tuple(line.strip() for line in sample.get("txt", b"").decode("utf-8").splitlines() if line.strip())
        rejection = None if captions else Rejection("no_captions", "the sample has no .txt captions")
        return Entry(where, Path(where), captions, rejection if data else Rejection("no_image", "no image member"), data)
    label_text = sample.get("cls", b"").decode("ascii", "replace").strip()
    if not _INTEGER.fullmatch(label_text) or not 0 <= int(label_text) < num_classes:
        return Entry(where, Path(where), -1, Rejection("bad_label", f".cls {label_text!r} for {num_classes} classes"))
    return Entry(where, Path(where), int(label_text), None if data else Rejection("no_image", "no image member"), data)


def from_shards(folder: Path, meta: ClassMetadata) -> BenchmarkSet:
    """`clip-prep` shards: a classification set (KEY.<image> + KEY.cls, with class names beside the
    shards, given, or in ROOT already) or, without any class names, a retrieval set (KEY.txt)."""
    shards = sorted(folder.glob("*.tar")) if folder.is_dir() else []
    if not shards:
        raise BenchmarkSetError(f"--from-shards {str(folder)!r} holds no .tar shards")
    given_names, given_templates = given_metadata(meta)
    # Class names (beside the shards, given, or already in ROOT) make it a classification set:
    # the demo's train split carries captions and labels, and is the probe's train split of test.
    has_names = (folder / CLASSNAMES_FILE).is_file() or given_names is not None
    kind = CLASSIFICATION if has_names else RETRIEVAL
    classnames, templates = None, None
    if kind == CLASSIFICATION:
        classnames = given_names or read_classnames_file(folder / CLASSNAMES_FILE)
        own_templates = next((folder / n for n in SHARD_TEMPLATE_FILES if (folder / n).is_file()), None)
        explicit = meta.templates_file or meta.dataset_name
        templates = given_templates if explicit or own_templates is None else read_templates_file(own_templates)
    entries = [_shard_entry(where, sample, kind, len(classnames or ())) for where, sample in _shard_samples(shards)]
    if not entries:
        raise BenchmarkSetError(f"--from-shards {str(folder)!r}: its shards hold no samples")
    return BenchmarkSet(kind, entries, classnames, templates)


def _lines_as_read(path: Path) -> list[str]:
    # CLIP_benchmark strips every line it reads, so that is the equality that matters.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _root_kind(root: Path) -> str | None:
    """What ROOT already holds: RETRIEVAL, CLASSIFICATION, or None for a new root."""
    if (root / DATASET_TYPE_FILE).is_file():
        return (root / DATASET_TYPE_FILE).read_text(encoding="utf-8").strip().lower()
    if (root / CLASSNAMES_FILE).exists() or (root / TEMPLATES_FILE).exists():
        return CLASSIFICATION
    return None


def check_destination(dataset: BenchmarkSet, destination: Destination) -> None:
    """Refuse, before anything is written, a ROOT that holds another dataset or an existing split."""
    root, split_dir = destination.root, destination.split_dir
    if root.exists() and not root.is_dir():
        raise BenchmarkSetError(f"--out {str(root)!r} exists and is not a folder")
    present = _root_kind(root)
    if present is not None and present != dataset.kind:
        raise BenchmarkSetError(f"{root} holds a {present} set; this input is a {dataset.kind} set")
    for name, lines in dataset.metadata_files().items():
        path = root / name
        if path.exists() and _lines_as_read(path) != lines:
            raise BenchmarkSetError(
                f"{path} differs from this split's {name}; every split of a ROOT shares it (remove it to replace it)"
            )
    if split_dir.exists():
        if not split_dir.is_dir():
            raise BenchmarkSetError(f"{split_dir} exists and is not a folder")
        if any(split_dir.iterdir()) and not destination.overwrite:
            raise BenchmarkSetError(f"split folder {str(split_dir)!r} already exists; pass --overwrite to replace it")


def clear_split(split_dir: Path) -> None:
    """Delete what an earlier conversion wrote, and nothing else; nshards.txt goes first, so
    a crash half way leaves a folder that no reader takes for a complete set."""
    (split_dir / NSHARDS_FILE).unlink(missing_ok=True)
    for entry in split_dir.iterdir():
        if entry.is_file() and _OUR_SPLIT_FILE.match(entry.name):
            entry.unlink()


def encode_webp(path: Path, data: bytes | None = None) -> bytes | Rejection:
    """An image file (or its bytes) as lossless WEBP bytes, or why it cannot be."""
    data = read_media_bytes(path) if data is None else data
    if isinstance(data, Rejection):
        return data
    image = decode_image(data, DEFAULT_MAX_PIXELS)  # strict: a truncated file is rejected, not grey-padded
    if isinstance(image, Rejection):
        return image
    try:
        rgb = image.convert("RGB")
    except Exception as error:  # a colour mode PIL cannot convert (LAB, HSV)
        return Rejection("unconvertible_image", f"{image.mode} image: {type(error).__name__}: {error}")
    buffer = io.BytesIO()
    try:
        rgb.save(buffer, format="WEBP", lossless=True)
    except Exception as error:  # WEBP stops at 16383 pixels a side
        return Rejection("unencodable_image", f"{rgb.width}x{rgb.height} as WEBP: {type(error).__name__}: {error}")
    return buffer.getvalue()


def encode_entry(entry: Entry) -> bytes | Rejection:
    """Runs in worker processes; any unexpected failure becomes a rejection, not a crashed run."""
    if entry.rejection is not None:
        return entry.rejection
    try:
        return encode_webp(entry.path, entry.data)
    except Exception as error:
        return Rejection("unexpected_error", f"{type(error).__name__}: {error}")


def _target_member(target: Target) -> dict[str, bytes]:
    if isinstance(target, int):
        return {"cls": str(target).encode("ascii")}
    return {"txt": "\n".join(target).encode("utf-8")}


class ShardSink:
    """Tar shards 0.tar, 1.tar, ... of at most `per_shard` samples, keyed s0000000, ... A shard
    is opened only when a sample arrives, so no empty tar is left behind."""

    def __init__(self, folder: Path, per_shard: int):
        self.folder, self.per_shard = folder, per_shard
        self.written = self.shards = 0
        self._tar = None
        self._in_shard = 0

    def write(self, image: bytes, target: Target) -> None:
        if self._tar is not None and self._in_shard >= self.per_shard:
            self.close()
        if self._tar is None:
            # encoder=False: members are already bytes; fixed mtime/owner make shards reproducible.
            path = str(self.folder / f"{self.shards}.tar")
            self._tar = wds.TarWriter(path, encoder=False, mtime=0, user="", group="", mode=0o644)
            self.shards += 1
        self._tar.write({"__key__": KEY_FORMAT % self.written, "webp": image, **_target_member(target)})
        self._in_shard += 1
        self.written += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._in_shard = None, 0


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _rejection_line(index: int, entry: Entry, rejection: Rejection) -> str:
    record = {"index": index, "source": entry.source, "path": str(entry.path),
              "reason": rejection.reason, "detail": rejection.detail}
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_benchmark_set(dataset: BenchmarkSet, destination: Destination, workers: int = 1) -> ConversionSummary:
    """Encode every entry into the split's shards (or rejected.jsonl), then the ROOT metadata
    that is still missing, then nshards.txt."""
    if not dataset.entries:
        raise BenchmarkSetError("no input images found")
    check_destination(dataset, destination)
    split_dir = destination.split_dir
    if split_dir.is_dir():
        clear_split(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    sink, rejected = ShardSink(split_dir, destination.samples_per_shard), 0
    with open(split_dir / REJECTED_FILE, "w", encoding="utf-8") as rejects:
        try:
            results = encode_in_order(dataset.entries, encode_entry, workers)
            for index, (entry, result) in enumerate(zip(dataset.entries, results)):
                if isinstance(result, Rejection):
                    rejects.write(_rejection_line(index, entry, result))
                    rejected += 1
                else:
                    sink.write(result, entry.target)
        finally:
            sink.close()
    if sink.written + rejected != len(dataset.entries):
        raise InvariantError(f"written ({sink.written}) + rejected ({rejected}) != inputs ({len(dataset.entries)})")
    if sink.written == 0:
        raise BenchmarkSetError(
            f"no image could be written: all {rejected} inputs were rejected (see {split_dir / REJECTED_FILE})"
        )
    for name, lines in dataset.metadata_files().items():
        if not (destination.root / name).exists():
            _write_lines(destination.root / name, lines)
    _write_lines(split_dir / NSHARDS_FILE, [str(sink.shards)])
    return ConversionSummary(sink.written, rejected, sink.shards, split_dir)
