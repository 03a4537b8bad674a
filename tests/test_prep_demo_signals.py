"""clip-prep demo --modality audio|ecg: small demos (per-class limits keep them fast)."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from data_prep import demo_audio, demo_ecg
from data_prep.ecg import STANDARD_LEADS

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import read_json, read_shards, run_cli
except ImportError:
    from tests.prep_fixtures import read_json, read_shards, run_cli

SPLITS = ("train", "test", "retrieval")


def build(tmp_path_factory, modality, train, test, *extra):
    out = tmp_path_factory.mktemp(modality) / "demo"
    assert run_cli("demo", "--modality", modality, "--out", out, "--train-per-class", train,
                   "--test-per-class", test, "--workers", 2, *extra) == 0
    return out, {split: read_shards(out / split) for split in SPLITS}


def meta(sample) -> dict:
    return json.loads(sample["json"])


def check_common_contract(out, splits, classnames, zero_shot_templates, train, test, media):
    assert (out / "test" / "classnames.txt").read_text().splitlines() == list(classnames)
    templates = (out / "test" / "templates.txt").read_text().splitlines()
    assert templates == list(zero_shot_templates) and all("{c}" in t for t in templates)
    classes = len(classnames)
    assert Counter(meta(s)["label"] for s in splits["train"].values()) == {c: train for c in range(classes)}
    assert Counter(meta(s)["label"] for s in splits["test"].values()) == {c: test for c in range(classes)}
    for split in SPLITS:
        manifest = read_json(out / split / "manifest.json")
        assert (manifest["written"], manifest["rejected"]) == (len(splits[split]), 0)
    for sample in splits["test"].values():
        assert set(sample) == {media, "cls", "txt", "json"}
        metadata = meta(sample)
        assert int(sample["cls"]) == metadata["label"] and metadata["labels"] == [metadata["label"]]
        assert metadata["classname"] == classnames[metadata["label"]]
    assert list(splits["retrieval"]) == list(splits["test"])
    for key, sample in splits["retrieval"].items():
        captions = sample["txt"].decode().splitlines()
        assert len(captions) >= 3 and len(set(captions)) == len(captions)
        assert sample[media] == splits["test"][key][media]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_audio_demo(tmp_path_factory):
    soundfile = pytest.importorskip("soundfile")
    out, splits = build(tmp_path_factory, "audio", 5, 2)
    check_common_contract(out, splits, demo_audio.CLASSNAMES, demo_audio.ZERO_SHOT_TEMPLATES, 5, 2, "flac")
    train_voices = {meta(s)["voice"] for s in splits["train"].values()}
    test_voices = {meta(s)["voice"] for s in splits["test"].values()}
    assert train_voices <= set(demo_audio.TRAIN_VOICES) and test_voices <= set(demo_audio.TEST_VOICES)
    assert not train_voices & test_voices and len(train_voices) > 1
    variants = lambda voices: {v.split("+")[1] for v in voices}  # noqa: E731
    assert not variants(demo_audio.TRAIN_VOICES) & variants(demo_audio.TEST_VOICES)
    for sample in list(splits["train"].values()) + list(splits["test"].values()):
        metadata = meta(sample)
        assert {"voice", "speed", "pitch", "digit"} <= set(metadata) and metadata["digit"] == metadata["label"]
        audio, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 16000 and audio.ndim == 1 and 0.2 < len(audio) / rate < 2.0
        assert np.abs(audio).max() > 0.05  # speech, not silence
        word, numeral = demo_audio.CLASSNAMES[metadata["label"]], str(metadata["label"])
        assert word in sample["txt"].decode() or numeral in sample["txt"].decode()


def test_audio_demo_without_espeak_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_audio.shutil, "which", lambda name: None)
    assert run_cli("demo", "--modality", "audio", "--out", tmp_path / "demo") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install espeak-ng" in err[0]
    assert not (tmp_path / "demo").exists()


def test_ecg_demo(tmp_path_factory):
    pytest.importorskip("neurokit2")
    out, splits = build(tmp_path_factory, "ecg", 4, 2, "--ecg-rate", 250)
    check_common_contract(out, splits, demo_ecg.CLASSNAMES, demo_ecg.ZERO_SHOT_TEMPLATES, 4, 2, "npy")
    train_sims = {meta(s)["simulation"] for s in splits["train"].values()}
    test_sims = {meta(s)["simulation"] for s in splits["test"].values()}
    assert train_sims and test_sims and not train_sims & test_sims  # held-out records
    for sample in list(splits["train"].values()) + list(splits["test"].values()):
        metadata = meta(sample)
        array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        assert (array.shape, array.dtype) == ((12, 2500), np.float16) and np.isfinite(array).all()
        assert metadata["leads"] == list(STANDARD_LEADS) and metadata["sample_rate"] == 250
        low, high = demo_ecg.HEART_RATES[metadata["label"]]
        assert low <= metadata["heart_rate"] <= high and metadata["noise"] in demo_ecg.NOISE_LEVELS
        assert 0.3 < np.abs(array).max() < 3.0  # millivolt-scale beats
    first = meta(next(iter(splits["train"].values())))
    assert str(first["heart_rate"]) in first["caption"] or first["caption"].rstrip(".").lower() in {
        phrase.lower() for phrase in demo_ecg.CLASS_PHRASES[first["label"]]}
