"""clip-prep benchmark-set: class folders, CSVs and Karpathy JSONs converted to CLIP_benchmark's
webdataset layout, and read back with CLIP_benchmark's own reader (`build_wds_dataset`)."""
from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
from clip_benchmark.datasets.builder import build_wds_dataset
from PIL import Image

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import run_cli
except ImportError:
    from tests.prep_fixtures import run_cli

# CLIP_benchmark's reader leaves WebDataset's shardshuffle unset; the warning is about its code, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")

CLASSES = ("golden_retriever", "tabby_cat", "zebra")  # folder names; "_" reads as a space


def colour(label: int, index: int) -> tuple[int, int, int]:
    """A different solid colour per image, so every sample can be told apart after the round trip."""
    return (60 * label + 10, 40 * index + 5, 200)


def save_image(path: Path, rgb: tuple[int, int, int], fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (7, 5), rgb).save(path, format=fmt)
    return path


def make_class_folders(root: Path, per_class: int = 4) -> list[tuple[tuple[int, int, int], int]]:
    """CLASSES x per_class images; returns (colour, label) in ImageFolder order."""
    expected = []
    for label, name in enumerate(CLASSES):
        for index in range(per_class):
            save_image(root / name / f"img{index}.png", colour(label, index))
            expected.append((colour(label, index), label))
    return expected


def write_csv(path: Path, rows: list[tuple[str, str]], header=("path", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as table:
        writer = csv.writer(table)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_back(root: Path, split: str = "test"):
    """(samples as (first pixel, label or captions), classes, templates), as CLIP_benchmark sees them."""
    dataset = build_wds_dataset("wds/converted", lambda image: image, split=split, data_dir=str(root))
    samples = [(image.convert("RGB").getpixel((0, 0)), target) for image, target in dataset]
    return samples, dataset.classes, dataset.templates


def tar_keys(split_dir: Path) -> list[str]:
    keys = []
    shards = sorted(split_dir.glob("*.tar"), key=lambda path: int(path.stem))
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys += [name.split(".")[0] for name in tar.getnames() if name.endswith(".webp")]
    return keys


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("clip-prep: error: ")
    return lines[0]


def test_class_folders_read_back_by_clip_benchmark(tmp_path, capsys):
    expected = make_class_folders(tmp_path / "folder")
    root = tmp_path / "root"
    code = run_cli("benchmark-set", "--out", root, "--from-folder", tmp_path / "folder",
                   "--samples-per-shard", 5, "--workers", 1)
    assert code == 0
    split = root / "test"
    assert capsys.readouterr().out.strip() == (
        f"clip-prep: wrote 12 samples in 3 shards to {split}; rejected 0 (see {split / 'rejected.jsonl'})"
    )

    samples, classes, templates = read_back(root)
    assert samples == expected  # lossless WEBP: the exact colours, in ImageFolder order
    assert classes == ["golden retriever", "tabby cat", "zebra"]
    assert templates == ["a photo of a {c}."]
    assert (root / "test" / "nshards.txt").read_text() == "3\n"
    assert tar_keys(root / "test") == [f"s{index:07d}" for index in range(12)]
    assert not (root / "dataset_type.txt").exists()
    assert (root / "test" / "rejected.jsonl").read_text() == ""


def test_worker_processes_write_the_same_bytes(tmp_path):
    make_class_folders(tmp_path / "folder")
    for workers in (1, 2):
        assert run_cli("benchmark-set", "--out", tmp_path / f"w{workers}", "--from-folder", tmp_path / "folder",
                       "--samples-per-shard", 5, "--workers", workers) == 0
    for shard in ("0.tar", "1.tar", "2.tar"):
        assert (tmp_path / "w1" / "test" / shard).read_bytes() == (tmp_path / "w2" / "test" / shard).read_bytes()


def test_csv_of_class_names_and_a_second_split_in_the_same_root(tmp_path, capsys):
    names = ["zebra", "cat", "dog"]
    test_rows = []
    for index in range(6):  # relative paths resolve against the CSV's own folder
        save_image(tmp_path / "data" / "images" / f"t{index}.jpg", colour(index % 3, index), fmt="PNG")
        test_rows.append((f"images/t{index}.jpg", names[index % 3]))
    # Absolute paths work too; and the train split names one class only: it inherits ROOT's names.
    train_rows = [(str(save_image(tmp_path / "elsewhere" / "a.png", colour(0, 5))), "dog")]
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-csv", write_csv(tmp_path / "data" / "test.csv", test_rows),
                   "--samples-per-shard", 4, "--workers", 1) == 0
    assert run_cli("benchmark-set", "--out", root, "--split", "train", "--workers", 1,
                   "--from-csv", write_csv(tmp_path / "data" / "train.csv", train_rows)) == 0

    samples, classes, _ = read_back(root, "test")
    assert classes == ["cat", "dog", "zebra"]  # sorted unique names
    assert samples == [(colour(index % 3, index), classes.index(names[index % 3])) for index in range(6)]
    assert (root / "test" / "nshards.txt").read_text() == "2\n"
    assert read_back(root, "train")[0] == [(colour(0, 5), 1)]
    capsys.readouterr()

    # A split with other class names, or a class ROOT does not have, cannot share this ROOT.
    (tmp_path / "other_names.txt").write_text("cat\ndog\nemu\n")
    other = write_csv(tmp_path / "data" / "val.csv", [("images/t0.jpg", "cat"), ("images/t1.jpg", "emu")])
    assert run_cli("benchmark-set", "--out", root, "--split", "val", "--from-csv", other,
                   "--classnames", tmp_path / "other_names.txt") == 2
    assert "classnames.txt differs" in one_error_line(capsys)
    assert run_cli("benchmark-set", "--out", root, "--split", "val", "--from-csv", other) == 2
    assert "val.csv line 3: label 'emu' is not one of the 3 class names" in one_error_line(capsys)
    assert not (root / "val").exists()


def test_csv_of_class_indices_with_given_names_and_templates(tmp_path):
    for index in range(3):
        save_image(tmp_path / f"{index}.png", colour(index, 0))
    table = write_csv(tmp_path / "set.csv", [(f"{index}.png", str(2 - index)) for index in range(3)], ("file", "y"))
    (tmp_path / "names.txt").write_text("red panda\nkoala\nwombat\n")
    (tmp_path / "prompts.txt").write_text("a photo of a {c}.\n\na blurry photo of the {c}.\n")
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-csv", table, "--path-column", "file", "--label-column", "y",
                   "--classnames", tmp_path / "names.txt", "--templates", tmp_path / "prompts.txt", "--workers", 1) == 0

    samples, classes, templates = read_back(root)
    assert samples == [(colour(index, 0), 2 - index) for index in range(3)]
    assert classes == ["red panda", "koala", "wombat"]
    assert templates == ["a photo of a {c}.", "a blurry photo of the {c}."]


def make_karpathy(tmp_path: Path) -> tuple[Path, Path, list]:
    """Four images: test ones in a filepath sub-folder, in the flat folder, and one train image."""
    images = tmp_path / "coco"
    records = []
    for index, (split, subfolder) in enumerate([("test", "val2014"), ("train", "train2014"),
                                                ("test", None), ("test", "val2014")]):
        name = f"COCO_{index}.jpg"
        # the last one's filepath names a sub-folder that does not hold it: the flat copy is used
        folder = images / subfolder if subfolder and index != 3 else images
        save_image(folder / name, colour(0, index), fmt="PNG")
        record = {"filename": name, "split": split,
                  "sentences": [{"raw": f"a photo number {index}."}, {"raw": f"caption two of {index}"}]}
        if subfolder:
            record["filepath"] = subfolder
        records.append(record)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": records}))
    return path, images, records


def test_karpathy_json_read_back_as_retrieval(tmp_path):
    karpathy, images, records = make_karpathy(tmp_path)
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-karpathy", karpathy, "--images", images,
                   "--samples-per-shard", 2, "--workers", 1) == 0

    samples, classes, templates = read_back(root)
    kept = [0, 2, 3]
    assert samples == [(colour(0, index), [s["raw"] for s in records[index]["sentences"]]) for index in kept]
    assert classes is None and templates is None
    assert (root / "dataset_type.txt").read_text() == "retrieval\n"
    assert tar_keys(root / "test") == ["s0000000", "s0000001", "s0000002"]

    assert run_cli("benchmark-set", "--out", root, "--split", "train", "--from-karpathy", karpathy,
                   "--images", images, "--karpathy-split", "train", "--workers", 1) == 0
    assert read_back(root, "train")[0] == [(colour(0, 1), ["a photo number 1.", "caption two of 1"])]


def test_corrupt_and_stray_files_are_rejected_with_a_reason(tmp_path, capsys):
    expected = make_class_folders(tmp_path / "folder", per_class=2)
    (tmp_path / "folder" / "tabby_cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "folder" / "zebra" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "folder" / "loose.png", (1, 2, 3))  # in no class folder
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-folder", tmp_path / "folder", "--workers", 1) == 0
    rejected_file = root / "test" / "rejected.jsonl"
    assert capsys.readouterr().out.strip() == (
        f"clip-prep: wrote 6 samples in 1 shard to {root / 'test'}; rejected 3 (see {rejected_file})"
    )

    rejected = [json.loads(line) for line in rejected_file.read_text().splitlines()]
    assert [(line["source"], line["reason"]) for line in rejected] == [
        ("loose.png", "not_in_class_folder"),
        ("tabby_cat/broken.jpg", "truncated_image"),
        ("zebra/notes.txt", "not_an_image"),
    ]
    assert all(line["path"].startswith(str(tmp_path / "folder")) and line["detail"] for line in rejected)
    assert read_back(root)[0] == expected


def test_overwrite_replaces_the_split(tmp_path):
    make_class_folders(tmp_path / "folder")
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-folder", tmp_path / "folder",
                   "--samples-per-shard", 2, "--workers", 1) == 0
    assert run_cli("benchmark-set", "--out", root, "--from-folder", tmp_path / "folder",
                   "--samples-per-shard", 100, "--workers", 1, "--overwrite") == 0
    assert sorted(path.name for path in (root / "test").iterdir()) == ["0.tar", "nshards.txt", "rejected.jsonl"]
    assert len(read_back(root)[0]) == 12


def test_an_interrupted_conversion_leaves_no_nshards(tmp_path, monkeypatch, capsys):
    make_class_folders(tmp_path / "folder")
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-folder", tmp_path / "folder", "--workers", 1) == 0

    from data_prep import benchmark_set

    def interrupted(entry):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark_set, "encode_entry", interrupted)
    assert run_cli("benchmark-set", "--out", root, "--from-folder", tmp_path / "folder", "--workers", 1,
                   "--overwrite") == 130
    assert not (root / "test" / "nshards.txt").exists()
    assert "incomplete" in capsys.readouterr().err


ERROR_CASES = {
    "missing folder": (["--from-folder", "{tmp}/nowhere"], "--from-folder"),
    "missing csv": (["--from-csv", "{tmp}/nowhere.csv"], "--from-csv"),
    "missing json": (["--from-karpathy", "{tmp}/nowhere.json", "--images", "{tmp}/images"], "--from-karpathy"),
    "template without {c}": (["--from-folder", "{tmp}/folder", "--templates", "{tmp}/bad_prompts.txt"], "has no {c}"),
    "index out of range": (["--from-csv", "{tmp}/index.csv", "--classnames", "{tmp}/two_names.txt"],
                           "index.csv line 3: label 2 is out of range for 2 classes"),
    "unknown class name": (["--from-csv", "{tmp}/names.csv", "--classnames", "{tmp}/two_names.txt"],
                           "names.csv line 2: label 'emu' is not one of the 2 class names"),
    "indices without names": (["--from-csv", "{tmp}/index.csv"], "--classnames or --dataset-name"),
    "missing column": (["--from-csv", "{tmp}/names.csv", "--label-column", "y"], "no column 'y'"),
    "split exists": (["--from-folder", "{tmp}/folder", "--out", "{tmp}/done"], "already exists; pass --overwrite"),
    "no images": (["--from-folder", "{tmp}/empty_classes"], "class folders hold no files"),
    "all rejected": (["--from-folder", "{tmp}/all_bad"], "all 1 inputs were rejected"),
    "retrieval into a classification root": (["--from-karpathy", "{tmp}/dataset_coco.json", "--images", "{tmp}/coco",
                                              "--out", "{tmp}/done", "--split", "val"], "holds a classification set"),
    "unknown karpathy split": (["--from-karpathy", "{tmp}/dataset_coco.json", "--images", "{tmp}/coco",
                                "--karpathy-split", "tset"], "splits present: test, train"),
    "karpathy without images": (["--from-karpathy", "{tmp}/dataset_coco.json"], "needs --images"),
    "two sources": (["--from-folder", "{tmp}/folder", "--from-csv", "{tmp}/names.csv"], "not allowed with"),
    "column flag on a folder": (["--from-folder", "{tmp}/folder", "--label-column", "y"], "only used with --from-csv"),
    "bad split name": (["--from-folder", "{tmp}/folder", "--split", "../up"], "--split"),
}


@pytest.fixture
def error_inputs(tmp_path):
    make_class_folders(tmp_path / "folder", per_class=1)
    (tmp_path / "bad_prompts.txt").write_text("a photo of a {c}.\na photo of a thing.\n")
    (tmp_path / "two_names.txt").write_text("cat\ndog\n")
    save_image(tmp_path / "x.png", (0, 0, 0))
    write_csv(tmp_path / "index.csv", [("x.png", "0"), ("x.png", "2")])
    write_csv(tmp_path / "names.csv", [("x.png", "emu")])
    (tmp_path / "empty_classes" / "a").mkdir(parents=True)
    (tmp_path / "all_bad" / "a").mkdir(parents=True)
    (tmp_path / "all_bad" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    make_karpathy(tmp_path)
    (tmp_path / "images").mkdir()
    done = tmp_path / "done"
    assert run_cli("benchmark-set", "--out", done, "--from-folder", tmp_path / "folder", "--workers", 1) == 0
    return tmp_path


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_exit_2_with_one_line(error_inputs, capsys, case):
    arguments, fragment = ERROR_CASES[case]
    arguments = [argument.replace("{tmp}", str(error_inputs)) for argument in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(error_inputs / "out")]
    capsys.readouterr()
    assert run_cli("benchmark-set", "--workers", 1, *arguments) == 2
    assert fragment in one_error_line(capsys)
    if case != "all rejected":  # that one keeps its rejected.jsonl, and no nshards.txt
        assert not (error_inputs / "out").exists()
    assert not (error_inputs / "out" / "test" / "nshards.txt").exists()


def test_dataset_name_gives_class_names_and_templates(tmp_path, capsys):
    try:
        from clip_train.eval.known_datasets import classification_metadata
    except ImportError:
        pytest.skip("clip_train.eval.known_datasets (shipped benchmark metadata) is not in this tree yet")
    classnames, templates = classification_metadata("cifar10")
    for index in range(3):
        save_image(tmp_path / f"{index}.png", colour(index, 1))
    table = write_csv(tmp_path / "set.csv", [(f"{index}.png", classnames[index * 3]) for index in range(3)])
    root = tmp_path / "root"
    assert run_cli("benchmark-set", "--out", root, "--from-csv", table, "--dataset-name", "cifar10",
                   "--workers", 1) == 0

    samples, read_classes, read_templates = read_back(root)
    assert samples == [(colour(index, 1), index * 3) for index in range(3)]
    assert (read_classes, read_templates) == (classnames, templates)
    capsys.readouterr()
    assert run_cli("benchmark-set", "--out", tmp_path / "other", "--from-csv", table,
                   "--dataset-name", "no_such_set") == 2
    assert "--dataset-name" in one_error_line(capsys)


def _shard_members(folder: Path) -> list[dict]:
    import webdataset as wds

    return [s for shard in sorted(folder.glob("*.tar")) for s in wds.WebDataset(str(shard), shardshuffle=False)]


def test_clip_prep_shards_convert_to_the_same_set(tmp_path, demo_dataset):
    """The demo's own zero-shot and retrieval sets, as CLIP_benchmark sees them once converted:
    the same images (pixel for pixel), labels, captions, class names and templates."""
    import io

    assert run_cli("benchmark-set", "--out", str(tmp_path / "cls"), "--from-shards", str(demo_dataset / "test"),
                   "--samples-per-shard", "100") == 0
    assert run_cli("benchmark-set", "--out", str(tmp_path / "ret"), "--from-shards",
                   str(demo_dataset / "retrieval")) == 0
    dataset = build_wds_dataset("wds/demo", lambda image: image, split="test", data_dir=str(tmp_path / "cls"))
    source = _shard_members(demo_dataset / "test")
    converted = list(dataset)
    assert [t for _, t in converted] == [int(s["cls"]) for s in source]
    assert [image.convert("RGB").tobytes() for image, _ in converted[:20]] == [
        Image.open(io.BytesIO(s["jpg"])).convert("RGB").tobytes() for s in source[:20]]
    assert dataset.classes == (demo_dataset / "test" / "classnames.txt").read_text().split("\n")[:10]
    assert dataset.templates == [t for t in (demo_dataset / "test" / "templates.txt").read_text().splitlines() if t]
    assert (tmp_path / "cls" / "test" / "nshards.txt").read_text().strip() == "4"  # 360 samples, 100 a shard
    captions = [t for _, t in build_wds_dataset("wds/demo", lambda image: image, split="test",
                                                data_dir=str(tmp_path / "ret"))]
    assert captions == [s["txt"].decode().splitlines() for s in _shard_members(demo_dataset / "retrieval")]
