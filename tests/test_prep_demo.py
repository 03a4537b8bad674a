"""clip-prep demo: the embedded handwritten-digits dataset and its on-disk contract."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data_prep.demo import CAPTION_TEMPLATES, ZERO_SHOT_TEMPLATES, caption

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import decode_jpeg, read_json, read_shards, run_cli
except ImportError:
    from tests.prep_fixtures import decode_jpeg, read_json, read_shards, run_cli

DIGITS_TOTAL = 1797
IMAGE_SIZE = 24


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert run_cli("demo", "--out", out, "--image-size", IMAGE_SIZE, "--seed", 0) == 0
    return out


@pytest.fixture(scope="module")
def splits(demo_dir):
    return {split: read_shards(demo_dir / split) for split in ("train", "test", "retrieval")}


def labels_of(samples) -> list[int]:
    return [json.loads(sample["json"])["label"] for sample in samples.values()]


def test_split_sizes_are_stratified_80_20(demo_dir, splits):
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == DIGITS_TOTAL
    assert len(test) == pytest.approx(0.2 * DIGITS_TOTAL, abs=1)
    assert set(labels_of(test)) == set(range(10))
    for label, count in Counter(labels_of(test)).items():  # each class ~20% of its ~180 images
        assert 30 <= count <= 42, (label, count)
    train_sources = {json.loads(s["json"])["source"] for s in train.values()}
    test_sources = {json.loads(s["json"])["source"] for s in test.values()}
    assert not train_sources & test_sources  # held out means held out
    for split in ("train", "test", "retrieval"):
        assert sum(read_json(demo_dir / split / "sizes.json").values()) == len(splits[split])
        assert read_json(demo_dir / split / "manifest.json")["rejected"] == 0
    assert (demo_dir / "train" / "rejects.jsonl").read_text() == ""


def test_images_are_rgb_squares_of_the_requested_size(splits):
    for split in ("train", "test"):
        for sample in list(splits[split].values())[:50]:
            image = decode_jpeg(sample["jpg"])
            assert (image.mode, image.size) == ("RGB", (IMAGE_SIZE, IMAGE_SIZE))


def test_digits_are_dark_on_white(splits):
    image = decode_jpeg(next(iter(splits["train"].values()))["jpg"])
    corner = image.getpixel((0, 0))
    assert min(corner) > 230  # the 8x8 scans have empty borders
    assert np.asarray(image.convert("L")).min() < 100  # and some dark ink


def test_training_captions_come_from_the_templates_and_name_the_digit(splits):
    templates_used = set()
    for sample in splits["train"].values():
        label = json.loads(sample["json"])["label"]
        text = sample["txt"].decode()
        matching = [t for t in CAPTION_TEMPLATES if caption(t, label) == text]
        assert matching, text  # the caption names this sample's digit
        templates_used.update(matching)
    assert templates_used == set(CAPTION_TEMPLATES)  # seeded draws spread over all templates


def test_zero_shot_set_contract(demo_dir, splits):
    classnames = (demo_dir / "test" / "classnames.txt").read_text().splitlines()
    assert classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    templates = (demo_dir / "test" / "templates.txt").read_text().splitlines()
    assert 4 <= len(templates) <= 6 and all("{c}" in t for t in templates)
    assert not set(templates) & set(CAPTION_TEMPLATES)
    assert templates == list(ZERO_SHOT_TEMPLATES)
    for sample in splits["test"].values():
        assert set(sample) == {"jpg", "cls", "txt", "json"}
        assert int(sample["cls"].decode("ascii")) == json.loads(sample["json"])["label"]


def test_retrieval_set_has_several_captions_per_held_out_image(splits):
    assert list(splits["retrieval"]) == list(splits["test"])  # same images, same keys
    for key, sample in splits["retrieval"].items():
        captions = sample["txt"].decode().splitlines()
        assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
        assert sample["jpg"] == splits["test"][key]["jpg"]


def test_demo_is_reproducible_and_needs_overwrite(demo_dir, splits, capsys):
    assert run_cli("demo", "--out", demo_dir, "--image-size", IMAGE_SIZE) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("demo", "--out", demo_dir, "--image-size", IMAGE_SIZE, "--overwrite") == 0
    assert read_shards(demo_dir / "train") == splits["train"]  # same seed, same bytes
    assert "train 1437, test 360, retrieval 360" in capsys.readouterr().out


def test_webdataset_reads_the_zero_shot_set_as_clip_benchmark_does(demo_dir):
    webdataset = pytest.importorskip("webdataset")
    url = str(demo_dir / "test" / "00000.tar")
    dataset = webdataset.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json")
    rows = list(dataset)
    assert len(rows) == read_json(demo_dir / "test" / "sizes.json")["00000.tar"]
    for image, label, metadata in rows[:20]:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and label == metadata["label"]
