"""The eval harness end to end on tiny shard sets and a tiny random open_clip model, checked against
CLIP_benchmark's own functions fed the same model, loader and tokenizer."""
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file, save_file

from clip_train.eval import (
    DEFAULT_TEMPLATES,
    EvalError,
    build_classification_set,
    build_retrieval_set,
    evaluate,
    load_model,
    make_loader,
    run_training_eval,
    zeroshot_retrieval,
)
from benchmark_fixtures import MODEL_CFG, PREPROCESS_CFG
from clip_train.eval.cli import main

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
    "purple": (140, 30, 160), "orange": (240, 140, 20), "grey": (128, 128, 128), "cyan": (20, 220, 220),
}
CLASSNAMES = list(COLOURS)
TEMPLATES = ["a photo of a {c} thing.", "a {c} square."]


class _WritesMarkerWhenUnpickled:
    """A pickle member that would leave a file behind if anything unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _jpeg(colour, rng, size=40):
    # Noise keeps every image (hence every embedding) distinct, so no exact ties in the rankings.
    pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_shards(directory, samples, per_shard):
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard_index, start in enumerate(range(0, len(samples), per_shard)):
        name = f"{shard_index:05d}.tar"
        with wds.TarWriter(str(directory / name)) as writer:
            for sample in samples[start : start + per_shard]:
                writer.write(sample)
        sizes[name] = len(samples[start : start + per_shard])
    (directory / "sizes.json").write_text(json.dumps(sizes))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("run")
    export = run_dir / "export"
    export.mkdir()
    model = open_clip.CLIP(**MODEL_CFG)
    save_file(model.state_dict(), str(export / "open_clip_model.safetensors"))
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (export / "open_clip_config.json").write_text(json.dumps(config))
    return export


@pytest.fixture(scope="module")
def classification_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    rng = np.random.default_rng(0)
    marker = root / "UNPICKLED"
    samples = []
    for i in range(24):
        label = i % len(CLASSNAMES)
        sample = {
            "__key__": f"{i:06d}",
            "jpg": _jpeg(COLOURS[CLASSNAMES[label]], rng),
            "cls": str(label).encode(),
            "txt": f"a {CLASSNAMES[label]} square".encode(),
            "json": json.dumps({"label": label}).encode(),
        }
        if i == 3:
            sample["pyd"] = pickle.dumps(_WritesMarkerWhenUnpickled(marker))
        samples.append(sample)
    test_dir = root / "test"
    _write_shards(test_dir, samples, per_shard=8)
    (test_dir / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (test_dir / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return test_dir


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(1)
    samples = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        captions = [f"a {name} square", f"{name} noise", f"picture {i} of {name}"][: 2 + i % 2]
        text = "\n".join(captions) + ("\n\n" if i == 0 else "")  # a trailing empty line is dropped
        samples.append({"__key__": f"{i:06d}", "jpg": _jpeg(colour, rng), "txt": text.encode(), "json": b"{}"})
    _write_shards(root, samples, per_shard=5)
    return root


@pytest.fixture(scope="module")
def loaded(export_dir):
    return load_model(str(export_dir.parent))  # the run directory resolves to its export/


def test_export_dir_loads_in_open_clip(export_dir):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(export_dir))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(export_dir))
    image = preprocess(Image.new("RGB", (50, 40), (10, 20, 30))).unsqueeze(0)
    assert model.encode_image(image).shape == (1, 32)
    assert model.encode_text(tokenizer(["a red square"])).shape == (1, 32)


def test_load_model_resolves_run_dir_to_export_in_eval_mode(loaded, export_dir):
    assert loaded.name == str(export_dir)
    assert not loaded.model.training
    saved = load_file(str(export_dir / "open_clip_model.safetensors"))  # weights came from the file
    assert torch.equal(loaded.model.state_dict()["text_projection"], saved["text_projection"])


def test_classification_matches_clip_benchmark(loaded, export_dir, classification_dir, reference_accuracy):
    ours = evaluate(str(export_dir.parent), str(classification_dir), "zeroshot_classification", batch_size=6)
    dataset, classnames, templates = build_classification_set(classification_dir, loaded.preprocess)
    assert (classnames, templates) == (CLASSNAMES, TEMPLATES)
    theirs = reference_accuracy.evaluate(
        loaded.model, make_loader(dataset, 7, 0), loaded.tokenizer, classnames, templates, "cpu", amp=False
    )
    assert set(ours["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    for name, value in theirs.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-4), name


def test_shard_reading_skips_pickle_members_and_keeps_order(loaded, classification_dir):
    dataset, _, _ = build_classification_set(classification_dir, loaded.preprocess)
    labels = [label for _, label in dataset]
    assert labels == [i % len(CLASSNAMES) for i in range(24)]  # every sample, in file order
    assert not (classification_dir.parent / "UNPICKLED").exists()


def test_loader_with_workers_reads_every_sample_in_a_repeatable_order(loaded, classification_dir):
    dataset, _, _ = build_classification_set(classification_dir, loaded.preprocess)

    def labels_read():
        return [int(label) for _, labels in make_loader(dataset, 4, workers=2) for label in labels]

    first = labels_read()
    assert sorted(first) == sorted(i % len(CLASSNAMES) for i in range(24))
    assert labels_read() == first


def test_retrieval_matches_clip_benchmark(loaded, retrieval_dir):
    from clip_benchmark.metrics import zeroshot_retrieval as reference

    ks = [1, 2, 5]
    loader = make_loader(build_retrieval_set(retrieval_dir, loaded.preprocess), 3, 0)
    ours = zeroshot_retrieval(loaded.model, loaded.tokenizer, loader, "cpu", recall_k_list=ks)
    theirs = reference.evaluate(loaded.model, loader, loaded.tokenizer, "cpu", amp=False, recall_k_list=ks)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-4), name


def test_retrieval_captions_are_lists_per_image(loaded, retrieval_dir):
    images, captions = next(iter(make_loader(build_retrieval_set(retrieval_dir, loaded.preprocess), 2, 0)))
    assert images.shape == (2, 3, 32, 32)
    assert captions == [["a red square", "red noise"], ["a green square", "green noise", "picture 1 of green"]]


def test_evaluate_retrieval_json_shape_and_k_beyond_image_count(export_dir, retrieval_dir):
    result = evaluate(str(export_dir), str(retrieval_dir), "zeroshot_retrieval", batch_size=4)
    assert result["task"] == "zeroshot_retrieval" and result["language"] == "en"
    assert result["model"] == str(export_dir) and result["pretrained"] is None
    expected = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert set(result["metrics"]) == expected
    assert result["metrics"]["image_retrieval_recall@10"] == 1.0  # only 8 images: every query hits


def test_image_folder_with_underscored_class_names(loaded, tmp_path):
    rng = np.random.default_rng(2)
    for folder, colour in [("red_fox", (200, 60, 20)), ("big_blue_whale", (20, 40, 200)), ("cat", (90, 90, 90))]:
        (tmp_path / folder).mkdir()
        for i in range(2):
            (tmp_path / folder / f"{i}.jpg").write_bytes(_jpeg(colour, rng))
    dataset, classnames, templates = build_classification_set(tmp_path, loaded.preprocess)
    assert classnames == ["big blue whale", "cat", "red fox"]  # ImageFolder's sorted order
    assert templates == list(DEFAULT_TEMPLATES)
    assert [label for _, label in dataset] == [0, 0, 1, 1, 2, 2]
    result = evaluate(loaded.name, tmp_path, "zeroshot_classification")
    assert result["metrics"]["acc5"] is None  # 3 classes: top-5 undefined
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0


def test_templates_file_option_and_validation(loaded, classification_dir, tmp_path):
    custom = tmp_path / "prompts.txt"
    custom.write_text("{c}\n\nan image of {c}\n")
    _, _, templates = build_classification_set(classification_dir, loaded.preprocess, templates_file=custom)
    assert templates == ["{c}", "an image of {c}"]
    custom.write_text("no placeholder here\n")
    with pytest.raises(EvalError, match="placeholder"):
        build_classification_set(classification_dir, loaded.preprocess, templates_file=custom)


def test_run_training_eval_uses_eval_mode_without_grad_and_restores_train(export_dir, classification_dir, retrieval_dir):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(export_dir))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(export_dir))
    model.train()
    seen = []
    encode_image = model.encode_image

    def spying_encode_image(images, **kwargs):
        seen.append((model.training, torch.is_grad_enabled()))
        return encode_image(images, **kwargs)

    model.encode_image = spying_encode_image
    results = run_training_eval(model, preprocess, tokenizer, classification_dir, retrieval_dir, batch_size=8)
    assert model.training
    assert seen and set(seen) == {(False, False)}
    assert {"zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall"} <= set(results)
    assert "retrieval/image_retrieval_recall@1" in results and "retrieval/text_retrieval_recall@5" in results
    assert run_training_eval(model, preprocess, tokenizer) == {}


def test_cli_writes_json_and_prints_metrics(export_dir, classification_dir, tmp_path, capsys):
    output = tmp_path / "out" / "result.json"
    argv = ["--model", str(export_dir), "--dataset", str(classification_dir),
            "--task", "zeroshot_classification", "--output", str(output), "--batch-size", "8"]
    assert main(argv) == 0
    result = json.loads(output.read_text())
    assert set(result) == {"dataset", "model", "pretrained", "task", "metrics", "language",
                           "templates_source", "templates", "classnames", "per_class_recall"}
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result["templates"] == TEMPLATES and result["classnames"] == CLASSNAMES  # the dataset's own files
    assert result["templates_source"] == {"kind": "dataset_file", "path": str(classification_dir / "templates.txt")}
    assert {name: entry["count"] for name, entry in result["per_class_recall"].items()} == {c: 3 for c in CLASSNAMES}
    printed = capsys.readouterr().out
    assert "acc1=" in printed and "mean_per_class_recall=" in printed


def _bad_invocations(export_dir, classification_dir, tmp_path):
    no_classnames = tmp_path / "no_classnames"
    no_classnames.mkdir()
    (no_classnames / "00000.tar").write_bytes((classification_dir / "00000.tar").read_bytes())
    base = ["--output", str(tmp_path / "r.json")]
    zs = ["--task", "zeroshot_classification"]
    return {
        "missing dataset": ["--model", str(export_dir), "--dataset", str(tmp_path / "nope"), *zs, *base],
        "unknown task": ["--model", str(export_dir), "--dataset", str(classification_dir), "--task", "linear", *base],
        "missing model": ["--model", "no-such-model", "--dataset", str(classification_dir), *zs, *base],
        "neither run nor export dir": ["--model", str(tmp_path), "--dataset", str(classification_dir), *zs, *base],
        "missing pretrained file": ["--model", "ViT-B-32", "--pretrained", str(tmp_path / "w.pt"),
                                    "--dataset", str(classification_dir), *zs, *base],
        "no classnames.txt": ["--model", str(export_dir), "--dataset", str(no_classnames), *zs, *base],
        "missing argument": ["--model", str(export_dir), *zs, *base],
    }


def test_cli_bad_invocations_exit_2_with_one_line(export_dir, classification_dir, tmp_path, capsys):
    for case, argv in _bad_invocations(export_dir, classification_dir, tmp_path).items():
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("clip-eval: error: ") and err.count("\n") == 1, (case, err)
    assert not (tmp_path / "r.json").exists()


def test_cli_as_a_process_prints_no_traceback(tmp_path):
    argv = ["--model", "x", "--dataset", str(tmp_path / "nope"), "--task", "zeroshot_retrieval", "--output", "r.json"]
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "clip_train.eval.cli", *argv], capture_output=True, text=True, cwd=repo_root
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"clip-eval: error: dataset not found: {tmp_path / 'nope'}"]
