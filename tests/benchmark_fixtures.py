"""Benchmark sets for the tests, written here independently of `clip-prep benchmark-set` (so the
reader is not tested against our own writer only): scikit-learn's digits in CLIP_benchmark's
webdataset layout, and a tiny random open_clip model exported to a local directory."""
import io
import json

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {
    "size": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {c}.", "a drawing of a {c}."]


def export_random_model(directory, seed=0):
    """An open_clip local-dir export of a tiny random CLIP; returns its folder."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(open_clip.CLIP(**MODEL_CFG).state_dict(), str(directory / "open_clip_model.safetensors"))
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return directory


def digit_webp(pixels):
    """A 32x32 RGB lossless WEBP of one 8x8 digit scan (values 0..16)."""
    grey = (pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(grey).resize((32, 32), Image.NEAREST).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def digits():
    data = load_digits()
    return data.data, data.target


def write_split(root, split, samples, per_shard):
    """samples (dicts of members) as ROOT/split/0.tar ... with s%07d keys, then nshards.txt."""
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        with wds.TarWriter(str(split_dir / f"{shard}.tar")) as writer:
            for offset, members in enumerate(samples[start:start + per_shard]):
                writer.write({"__key__": f"s{start + offset:07d}", **members})
        count = shard + 1
    (split_dir / "nshards.txt").write_text(f"{count}\n")
    return split_dir


def write_classification_root(root, splits, per_shard=64, classnames=DIGIT_NAMES, templates=TEMPLATES):
    """CLIP_benchmark-layout digits: `splits` maps a split name to the digit indices it holds."""
    images, labels = digits()
    for split, indices in splits.items():
        samples = [{"webp": digit_webp(images[i]), "cls": str(int(labels[i])).encode()} for i in indices]
        write_split(root, split, samples, per_shard)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_retrieval_root(root, indices, per_shard=32):
    """CLIP_benchmark-layout retrieval digits: 2 or 3 captions per image, dataset_type.txt."""
    images, labels = digits()
    samples = []
    for n, i in enumerate(indices):
        name = DIGIT_NAMES[int(labels[i])]
        captions = [f"a drawing of a {name}", f"the number {name}", f"digit {int(labels[i])} scan {n}"][: 2 + n % 2]
        samples.append({"webp": digit_webp(images[i]), "txt": "\n".join(captions).encode()})
    write_split(root, "test", samples, per_shard)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def write_multilabel_root(root, indices, per_shard=32):
    """CLIP_benchmark-layout multilabel digits: each image is labelled with its digit and the
    digit's parity ("even"/"odd" as classes 10/11), as a KEY.npy multi-hot vector."""
    images, labels = digits()
    samples = []
    for i in indices:
        vector = np.zeros(12, dtype=np.float32)
        vector[int(labels[i])] = 1
        vector[10 + int(labels[i]) % 2] = 1
        buffer = io.BytesIO()
        np.save(buffer, vector)
        samples.append({"webp": digit_webp(images[i]), "npy": buffer.getvalue()})
    write_split(root, "test", samples, per_shard)
    (root / "classnames.txt").write_text("\n".join(DIGIT_NAMES + ["even number", "odd number"]) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "dataset_type.txt").write_text("multilabel\n")
    return root
