"""CLIP_benchmark-layout sets read by `clip-eval` and by CLIP_benchmark's own code, on the same model:
the metrics must agree (zero-shot to 1e-4, the linear probe exactly, see below). Also the
datasets' own layouts (ImageNet-style val folder with a labels file, Karpathy JSON) and the
one-line errors for bad benchmark data."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark_fixtures import (DIGIT_NAMES, TEMPLATES, digit_webp, digits, export_random_model,
                                write_classification_root, write_multilabel_root, write_retrieval_root)
from clip_train.eval import load_model
from clip_train.eval.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TEST, TRAIN, VAL = range(0, 150), range(150, 450), range(450, 550)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_random_model(tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return write_classification_root(tmp_path_factory.mktemp("wds_digits"), {"test": TEST, "train": TRAIN, "val": VAL},
                                     per_shard=64)


@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory):
    return write_retrieval_root(tmp_path_factory.mktemp("wds_retrieval"), range(0, 60), per_shard=16)


@pytest.fixture(scope="module")
def multilabel_root(tmp_path_factory):
    return write_multilabel_root(tmp_path_factory.mktemp("wds_multilabel"), range(0, 80), per_shard=32)


def run_cli(tmp_path, *args):
    out = tmp_path / "result.json"
    assert main([*args, "--output", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def reference_loader(root, split, transform, batch_size=16):
    """What CLIP_benchmark's cli builds for `--dataset wds/NAME --dataset_root ROOT`."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    dataset = build_wds_dataset("wds/digits", transform, split=split, data_dir=str(root))
    return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)


def test_zeroshot_classification_matches_clip_benchmark(tmp_path, model_dir, loaded, digits_root, reference_accuracy):
    ours = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(digits_root),
                   "--task", "zeroshot_classification")
    loader = reference_loader(digits_root, "test", loaded.preprocess)
    assert loader.dataset.classes == DIGIT_NAMES and loader.dataset.templates == TEMPLATES
    theirs = reference_accuracy.evaluate(loaded.model, loader, loaded.tokenizer, loader.dataset.classes,
                                         loader.dataset.templates, device="cpu", amp=False)
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours["metrics"][name] == pytest.approx(theirs[name], abs=1e-4), name
    assert ours["task"] == "zeroshot_classification" and ours["language"] == "en"


def test_zeroshot_retrieval_matches_clip_benchmark(tmp_path, model_dir, loaded, retrieval_root):
    from clip_benchmark.metrics import zeroshot_retrieval

    ours = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(retrieval_root), "--task",
                   "zeroshot_retrieval")
    loader = reference_loader(retrieval_root, "test", loaded.preprocess)
    theirs = zeroshot_retrieval.evaluate(loaded.model, loader, loaded.tokenizer, device="cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        for direction in ("image", "text"):
            name = f"{direction}_retrieval_recall@{k}"
            assert ours["metrics"][name] == pytest.approx(theirs[name], abs=1e-4), name


def test_multilabel_mean_average_precision_matches_clip_benchmark(tmp_path, model_dir, loaded, multilabel_root,
                                                                   reference_accuracy):
    ours = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(multilabel_root), "--task",
                   "zeroshot_multilabel")
    from clip_benchmark.datasets.builder import build_wds_dataset

    dataset = build_wds_dataset("wds/digits", loaded.preprocess, split="test", data_dir=str(multilabel_root))
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None)
    theirs = reference_accuracy.evaluate(loaded.model, loader, loaded.tokenizer, dataset.classes, dataset.templates,
                                         device="cpu", amp=False)
    assert ours["metrics"]["mean_average_precision"] == pytest.approx(theirs["mean_average_precision"], abs=1e-4)


class _CudaNamedCpu(str):
    """A device string that is "cpu" to torch but equal to "cuda" for CLIP_benchmark's
    `assert device == 'cuda'` in its linear probe, which is otherwise device-agnostic here."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def _their_linear_probe(monkeypatch, tmp_path, model, loaders, cache, seed=0):
    """CLIP_benchmark's linear_probe.evaluate on the CPU, its feature cache pre-filled with `cache`
    (role -> (features, targets)) so that both probes fit the very same features."""
    from clip_benchmark.metrics import linear_probe

    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(linear_probe, "accuracy", _numpy2_accuracy)
    feature_dir = tmp_path / "features" / "digits"
    feature_dir.mkdir(parents=True)
    for role, (features, targets) in cache.items():
        torch.save(features, feature_dir / f"features_{role}.pt")
        torch.save(targets, feature_dir / f"targets_{role}.pt")
    torch.manual_seed(seed)  # the RNG state its randperm sees, as our seeded permutation
    return linear_probe.evaluate(model, loaders["train"], loaders["test"], -1, 64, 0, 0.1, 10, "digits", seed,
                                 str(tmp_path / "features"), device=_CudaNamedCpu("cpu"),
                                 val_dataloader=loaders.get("val"), amp=False)


def _numpy2_accuracy(output, target, topk=(1,)):
    # CLIP_benchmark 1.6.2's accuracy calls float() on a one-element array, an error under numpy 2
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]


def test_linear_probe_features_and_fit_match_clip_benchmark(tmp_path, monkeypatch, model_dir, loaded, digits_root):
    from clip_benchmark.metrics.linear_probe import Featurizer

    cache = tmp_path / "cache"
    ours = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(digits_root), "--task", "linear_probe",
                   "--val-split", "val", "--feature-cache", str(cache))
    assert set(ours["metrics"]) >= {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"}
    assert ours["metrics"]["lp_acc1"] > 0.2  # a random 32-d model, ten classes: chance is 0.1

    # Our cached features are CLIP_benchmark's Featurizer output on its own loader of the same split...
    stored = {torch.load(p, weights_only=True)["split"].rsplit(":", 1)[1]: torch.load(p, weights_only=True)
              for p in cache.glob("*.pt")}
    assert set(stored) == {"train", "val", "test"}
    featurizer = Featurizer(loaded.model, normalize=True)
    loaders = {role: reference_loader(digits_root, role, loaded.preprocess) for role in ("train", "val", "test")}
    with torch.no_grad():
        for role, loader in loaders.items():
            theirs = torch.cat([featurizer(images) for images, _ in loader])
            targets = torch.cat([torch.as_tensor(t) for _, t in loader])
            torch.testing.assert_close(stored[role]["features"], theirs, atol=1e-6, rtol=0)
            assert torch.equal(stored[role]["targets"], targets.long())
    # ...and its probe, fitted on those features, chooses the same weight decay and scores the same.
    theirs = _their_linear_probe(monkeypatch, tmp_path, loaded.model, loaders,
                                 {r: (s["features"], s["targets"]) for r, s in stored.items()})
    for name in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"):
        assert ours["metrics"][name] == theirs[name], name


def test_linear_probe_reuses_its_feature_cache(tmp_path, model_dir, digits_root):
    cache = tmp_path / "cache"
    first = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(digits_root), "--task", "linear_probe",
                    "--feature-cache", str(cache), "--fewshot-k", "5")
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    again = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(digits_root), "--task", "linear_probe",
                    "--feature-cache", str(cache), "--fewshot-k", "5")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == stamps  # read, not rewritten
    assert again["metrics"] == first["metrics"] and first["metrics"]["fewshot_k"] == 5
    assert first["metrics"]["weight_decay"] == 0  # no validation split: no sweep


# --- the datasets' own layouts ---------------------------------------------------------------------


def _write_png(path, pixels):
    grey = (pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    Image.fromarray(grey).resize((32, 32), Image.NEAREST).convert("RGB").save(path)


def test_imagenet_style_val_folder_with_labels_file_reads_like_the_sharded_set(tmp_path, model_dir, digits_root):
    images, labels = digits()
    folder = tmp_path / "val"
    folder.mkdir()
    # Kaggle's LOC_val_solution.csv form: a header, image ids without extension, label first in column 2
    lines = ["ImageId,PredictionString"]
    for n, i in enumerate(TEST):
        (folder / f"VAL_{n:05d}.webp").write_bytes(digit_webp(images[i]))
        lines.append(f"VAL_{n:05d},{DIGIT_NAMES[labels[i]].replace(' ', '_')} 1 2 3 4")
    (folder / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    from_folder = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(folder), "--labels",
                          str(tmp_path / "labels.csv"), "--templates", str(digits_root /
                                                                              "zeroshot_classification_templates.txt"),
                          "--task", "zeroshot_classification")
    from_shards = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(digits_root),
                          "--task", "zeroshot_classification")
    assert from_folder["metrics"] == pytest.approx(from_shards["metrics"], abs=1e-6)


def test_labels_file_of_indices_and_wordnet_ids(tmp_path):
    from clip_train.eval.layouts import read_labels_file

    folder = tmp_path / "val"
    folder.mkdir()
    for name in ("a.JPEG", "b.JPEG", "c.JPEG"):
        Image.new("RGB", (4, 4)).save(folder / name, format="JPEG")
    (tmp_path / "val.txt").write_text("a.JPEG 2\nb.JPEG n0002\nc.JPEG one\n")
    labelled = read_labels_file(tmp_path / "val.txt", folder, ["zero", "one", "two"], wnids=["n0001", "n0002", "n0003"])
    assert [(p.name, c) for p, c in labelled] == [("a.JPEG", 2), ("b.JPEG", 1), ("c.JPEG", 1)]


def test_karpathy_json_reads_like_the_sharded_retrieval_set(tmp_path, model_dir, retrieval_root):
    import webdataset as wds

    images_dir = tmp_path / "images" / "val2014"
    images_dir.mkdir(parents=True)
    entries = []
    shards = sorted((retrieval_root / "test").glob("*.tar"), key=lambda p: int(p.stem))
    for n, sample in enumerate(s for shard in shards for s in wds.WebDataset(str(shard), shardshuffle=False)):
        (images_dir / f"COCO_{n:06d}.webp").write_bytes(sample["webp"])
        captions = sample["txt"].decode().splitlines()
        entries.append({"filepath": "val2014", "filename": f"COCO_{n:06d}.webp", "split": "test",
                        "sentences": [{"raw": c} for c in captions]})
        entries.append({"filepath": "val2014", "filename": f"COCO_{n:06d}.webp", "split": "train",
                        "sentences": [{"raw": "a training caption"}]})  # another split: left out
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    karpathy = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(tmp_path / "dataset_coco.json"),
                       "--images", str(tmp_path / "images"), "--task", "zeroshot_retrieval")
    sharded = run_cli(tmp_path, "--model", str(model_dir), "--dataset", str(retrieval_root),
                      "--task", "zeroshot_retrieval")
    assert karpathy["metrics"] == pytest.approx(sharded["metrics"], abs=1e-6)


# --- bad benchmark data: one line, exit 2 ----------------------------------------------------------


def _error_of(capsys, *args):
    assert main([*args, "--output", "unused.json", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clip-eval: error: ")
    return err


def _copy_root(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_missing_nshards_file(tmp_path, capsys, model_dir, digits_root):
    root = _copy_root(digits_root, tmp_path / "root")
    (root / "test" / "nshards.txt").unlink()
    err = _error_of(capsys, "--model", str(model_dir), "--dataset", str(root), "--task", "zeroshot_classification")
    assert "nshards.txt not found" in err


def test_shard_count_that_disagrees_with_nshards(tmp_path, capsys, model_dir, digits_root):
    root = _copy_root(digits_root, tmp_path / "root")
    (root / "test" / "nshards.txt").write_text("5\n")  # there are 3
    err = _error_of(capsys, "--model", str(model_dir), "--dataset", str(root), "--task", "zeroshot_classification")
    assert "says 5 shards" in err and "3 .tar files" in err


def test_class_index_outside_the_class_list(tmp_path, capsys, model_dir, digits_root):
    root = _copy_root(digits_root, tmp_path / "root")
    (root / "classnames.txt").write_text("\n".join(DIGIT_NAMES[:8]) + "\n")  # digits 8 and 9 have no name
    err = _error_of(capsys, "--model", str(model_dir), "--dataset", str(root), "--task", "zeroshot_classification")
    assert "out of range for 8 class names" in err


def test_template_without_class_slot(tmp_path, capsys, model_dir, digits_root):
    root = _copy_root(digits_root, tmp_path / "root")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na photo.\n")
    err = _error_of(capsys, "--model", str(model_dir), "--dataset", str(root), "--task", "zeroshot_classification")
    assert "without a {c} placeholder" in err and "a photo." in err


def test_unknown_dataset_name_lists_the_known_ones(tmp_path, capsys, model_dir, digits_root):
    err = _error_of(capsys, "--model", str(model_dir), "--dataset", str(digits_root), "--dataset-name", "imagenet2k",
                    "--task", "zeroshot_classification")
    assert "unknown dataset 'imagenet2k'" in err and "imagenet1k" in err and "cifar10" in err


def test_bad_input_exits_2_from_the_console_script(tmp_path, model_dir):
    proc = subprocess.run([sys.executable, "-m", "clip_train.eval.cli", "--model", str(model_dir), "--dataset",
                           str(tmp_path / "absent"), "--task", "linear_probe", "--output", "x.json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_device_auto_takes_this_ranks_gpu_when_there_is_one(monkeypatch):
    from clip_train.eval import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:3") == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # e.g. rank 3 of a node whose launcher exposes 2 GPUs to it
    assert resolve_device("auto") == "cuda:1"


def test_class_folders_of_a_known_dataset_take_its_names_in_folder_order(tmp_path):
    from clip_train.eval.datasets import DatasetRequest, resolve_classification_set
    from clip_train.eval.known_datasets import classification_metadata, imagenet_wnids

    names, templates = classification_metadata("cifar10")
    for folder in ("automobile", "0"):  # one by name, one by index
        (tmp_path / "by_index" / folder).mkdir(parents=True)
    for folder in ("9", "0", "1"):  # indices: ImageFolder sorts them as text, the names follow
        (tmp_path / "numbered" / folder).mkdir(parents=True)
    source = resolve_classification_set(DatasetRequest(tmp_path / "numbered", name="cifar10"))
    assert source.classnames == [names[0], names[1], names[9]] and source.templates == templates
    mixed = resolve_classification_set(DatasetRequest(tmp_path / "by_index", name="cifar10"))
    assert mixed.classnames == [names[0], "automobile"]
    wnids = imagenet_wnids()
    for wnid in (wnids[5], wnids[2]):
        (tmp_path / "imagenet" / wnid).mkdir(parents=True)
    imagenet = resolve_classification_set(DatasetRequest(tmp_path / "imagenet", name="imagenet1k"))
    assert imagenet.classnames == [classification_metadata("imagenet1k")[0][i] for i in (2, 5)]
    (tmp_path / "numbered" / "zebra").mkdir()
    with pytest.raises(Exception, match="'zebra' .* is none of cifar10's classes"):
        resolve_classification_set(DatasetRequest(tmp_path / "numbered", name="cifar10"))


def test_linear_probe_holds_out_a_validation_share_when_asked(tmp_path, model_dir, digits_root):
    from clip_train.eval.linear_probe import WEIGHT_DECAYS

    args = ["--model", str(model_dir), "--dataset", str(digits_root), "--task", "linear_probe",
            "--val-proportion", "0.25", "--lp-epochs", "3", "--lp-lr", "0.05", "--feature-cache", str(tmp_path / "c")]
    first, again = run_cli(tmp_path, *args), run_cli(tmp_path, *args)
    assert first["metrics"] == again["metrics"]  # the held-out share is seeded
    assert first["metrics"]["epochs"] == 3 and first["metrics"]["weight_decay"] in WEIGHT_DECAYS
    no_val = run_cli(tmp_path, *args[:6], "--lp-epochs", "3", "--lp-lr", "0.05")
    assert no_val["metrics"]["weight_decay"] == 0 and no_val["metrics"] != first["metrics"]
