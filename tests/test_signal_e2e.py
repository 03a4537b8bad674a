"""Audio-text and ECG-text models through the same trainer, export and clip-eval as images."""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from clip_train.cli import main as train_main
from clip_train.eval.cli import main as eval_main
from project_paths import DEMO_CONFIG

soundfile = pytest.importorskip("soundfile")
CLASSES = ["low", "high"]


def flac_tone(freq, rate=16000, seconds=0.6):
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def npy_ecg(rate_bpm, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(5000) / 500
    beat = np.sin(2 * np.pi * rate_bpm / 60 * t) ** 21  # sharp periodic peaks
    buf = io.BytesIO()
    np.save(buf, (beat[None] * rng.uniform(0.5, 1.5, (12, 1)) + 0.01 * rng.standard_normal((12, 5000)))
            .astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def write_set(root, member, make, n=24, captions_per_sample=1):
    root.mkdir(parents=True)
    with wds.TarWriter(str(root / "00000.tar")) as writer:
        for i in range(n):
            label = i % 2
            caption = "\n".join([f"a {CLASSES[label]} signal", f"the {CLASSES[label]} one"][:captions_per_sample])
            writer.write({"__key__": f"{i:09d}", member: make(label, i), "txt": caption, "cls": str(label),
                          "json": json.dumps({"labels": [label]})})
    (root / "sizes.json").write_text(json.dumps({"00000.tar": n}))
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "templates.txt").write_text("a {c} signal\n")
    return root


MODALITIES = {
    "audio": ("flac", lambda label, i: flac_tone(300 if label == 0 else 3000 + 10 * i), "demo-audio"),
    "ecg": ("npy", lambda label, i: npy_ecg(50 if label == 0 else 130, i), "demo-ecg"),
}


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_train_export_and_evaluate_a_signal_model(modality, tmp_path):
    member, make, model = MODALITIES[modality]
    train = write_set(tmp_path / "train", member, make)
    test = write_set(tmp_path / "test", member, make, n=10)
    retrieval = write_set(tmp_path / "retrieval", member, make, n=10, captions_per_sample=2)
    run = tmp_path / "run"
    assert train_main(["--config", DEMO_CONFIG, f"model.name={model}", f"data.train={train}", f"output_dir={run}",
                       f"eval.zeroshot={test}", f"eval.retrieval={retrieval}", "data.batch_size=8", "data.workers=0",
                       "train.steps=3", "train.log_every=1", "objective.terms.intra_image=0.5"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and "intra_image" in records[0]
    assert "zeroshot/acc1" in records[-1]
    assert (run / "export" / "signal_clip_config.json").is_file()
    out = tmp_path / "result.json"
    assert eval_main(["--model", str(run), "--dataset", str(test), "--task", "zeroshot_multilabel",
                      "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert 0 <= metrics["macro_auroc"] <= 1 and metrics["classes_scored"] == 2 and "acc1" in metrics
    assert eval_main(["--model", str(run / "export"), "--dataset", str(retrieval), "--task", "zeroshot_retrieval",
                      "--output", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["image_retrieval_recall@10"] == 1.0  # 10 candidates
    # the suite, with the linear probe (train is the sibling split of test) on the signal features
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"dataset_root: {tmp_path}/{{dataset}}\ndatasets:\n"
                          "  - {name: test, tasks: [zeroshot_classification, linear_probe]}\n"
                          "  - {name: retrieval, tasks: [zeroshot_retrieval]}\n")
    assert eval_main(["suite", "--model", str(run), "--suite", str(suite_file), "--output", str(tmp_path / "suite"),
                      "--device", "cpu", "--no-progress"]) == 0
    results = {json.loads(p.read_text())["task"]: json.loads(p.read_text())["metrics"]
               for p in (tmp_path / "suite").glob("*.json")}
    assert set(results) == {"zeroshot_classification", "linear_probe", "zeroshot_retrieval"}
    assert 0 <= results["linear_probe"]["lp_acc1"] <= 1 and results["linear_probe"]["lp_acc5"] is None  # 2 classes


def test_signal_batches_have_fixed_length_and_the_modality_key(tmp_path):
    from clip_train.config import DataConfig
    from clip_train.data import build_train_data
    from clip_train.models import build_model

    built = build_model("demo-audio")
    assert built.modality == "audio"
    root = write_set(tmp_path / "a", "flac", MODALITIES["audio"][1], n=8)
    data = build_train_data(DataConfig(train=str(root), batch_size=4, workers=0), built.train_transform,
                            built.tokenizer, seed=0, modality="audio")
    batch = next(iter(data.epoch_batches(0)))
    assert batch["audio"].shape == (4, 16000) and batch["audio"].dtype == torch.float32
