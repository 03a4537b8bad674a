"""The embedded demo dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans, no download) as captioned images, split 80/20 (stratified, seeded).

    DIR/train/      shards of KEY.jpg, KEY.txt (one caption), KEY.cls and KEY.json (with "label");
                    the class labels make it the linear probe's training split of DIR/test
    DIR/test/       zero-shot set: KEY.jpg, KEY.cls (b"3"), KEY.txt, KEY.json,
                    plus classnames.txt (zero..nine) and templates.txt ("... {c} ...")
    DIR/retrieval/  the same held-out images; KEY.txt holds several captions, one per line

Every split also has sizes.json, manifest.json and rejects.jsonl (empty), written by the
same DatasetWriter as `clip-prep shard`. Digits are dark on a white background.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.images import ImageOptions, encode_image_sample
from data_prep.samples import Encoded
from data_prep.writer import DatasetWriter, OutputDirError, prepare_output_dir, remove_previous_output

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions name the digit as a word ({word}) or a numeral ({digit}).
CAPTION_TEMPLATES = (
    "a handwritten digit {digit}",
    "the number {word}",
    "a photo of the digit {word}",
    "a scanned image of a handwritten {digit}",
    "a drawing of the numeral {digit}",
    "{word}, written by hand",
    "a small grayscale picture of the number {word}",
    "the handwritten numeral {word} in black ink",
)
# Zero-shot prompts: same spirit, deliberately not the training strings.
ZERO_SHOT_TEMPLATES = (
    "a handwritten digit {c}.",
    "a photo of the number {c}.",
    "the digit {c}.",
    "a blurry scan of the number {c}.",
    "a pixelated image of the digit {c}.",
)
TEST_FRACTION = 0.2
RETRIEVAL_CAPTIONS_PER_IMAGE = 4
SAMPLES_PER_SHARD = 1000
SPLITS = ("train", "test", "retrieval")
SPLIT_EXTRA_FILES = ("classnames.txt", "templates.txt")
_DIGIT_MAX = 16.0  # load_digits pixel values run 0..16


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(int)


def split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 split, so every class is in the held-out set in its usual share."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, test = train_test_split(indices, test_size=TEST_FRACTION, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def digit_png(pixels: np.ndarray) -> bytes:
    """An 8x8 scan (0..16, ink high) -> grayscale PNG with dark ink on white."""
    ink = np.round(pixels / _DIGIT_MAX * 255.0)
    gray = (255 - ink).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(template: str, label: int) -> str:
    return template.format(word=CLASSNAMES[label], digit=label)


def encode_digit(pixels: np.ndarray, text: str, image_size: int) -> Encoded:
    """Through the same encoder as `clip-prep shard`: bicubic upscale, RGB, JPEG."""
    options = ImageOptions(image_size=image_size, resize_mode="keep_ratio")
    encoded = encode_image_sample(digit_png(pixels), text, options)
    if not isinstance(encoded, Encoded):  # the digits are known-good; this would be a bug
        raise RuntimeError(f"demo image failed to encode: {encoded}")
    return encoded


def prepare_demo_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {str(out_dir)!r} is not empty; pass --overwrite to replace it")
    prepare_output_dir(out_dir, overwrite=True, extra_names=())
    for split in SPLITS:
        split_dir = out_dir / split
        if split_dir.is_dir():
            remove_previous_output(split_dir, SPLIT_EXTRA_FILES)
        split_dir.mkdir(exist_ok=True)


def _manifest_fields(split: str, image_size: int, seed: int) -> dict:
    return {
        "source_type": "demo:sklearn.load_digits",
        "modality": "image",
        "split": split,
        "options": {"image_size": image_size, "seed": seed, "test_fraction": TEST_FRACTION},
    }


def write_train(out_dir: Path, images, labels, indices, image_size: int, seed: int) -> int:
    rng = np.random.default_rng([seed, 1])
    writer = DatasetWriter(out_dir, SAMPLES_PER_SHARD)
    for key_index, digit_index in enumerate(indices):
        label = int(labels[digit_index])
        text = caption(CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))], label)
        encoded = encode_digit(images[digit_index], text, image_size)
        metadata = {"source": f"sklearn.datasets.load_digits[{digit_index}]", **encoded.metadata, "label": label}
        writer.write(key_index, {**encoded.members, "cls": str(label).encode("ascii")}, metadata)
    return writer.finish(len(indices), _manifest_fields("train", image_size, seed)).written


def write_held_out(out_dir: Path, images, labels, indices, image_size: int, seed: int) -> int:
    """The test (zero-shot) and retrieval splits share images and keys."""
    rng = np.random.default_rng([seed, 2])
    test = DatasetWriter(out_dir / "test", SAMPLES_PER_SHARD)
    retrieval = DatasetWriter(out_dir / "retrieval", SAMPLES_PER_SHARD)
    for key_index, digit_index in enumerate(indices):
        label = int(labels[digit_index])
        chosen = rng.choice(len(CAPTION_TEMPLATES), RETRIEVAL_CAPTIONS_PER_IMAGE, replace=False)
        captions = [caption(CAPTION_TEMPLATES[t], label) for t in chosen]
        encoded = encode_digit(images[digit_index], captions[0], image_size)
        metadata = {"source": f"sklearn.datasets.load_digits[{digit_index}]", **encoded.metadata, "label": label}
        test_members = {"jpg": encoded.members["jpg"], "cls": str(label).encode("ascii"), "txt": encoded.members["txt"]}
        test.write(key_index, test_members, {**metadata, "classname": CLASSNAMES[label]})
        retrieval_members = {"jpg": encoded.members["jpg"], "txt": "\n".join(captions).encode("utf-8")}
        retrieval.write(key_index, retrieval_members, {**metadata, "captions": captions})
    written = test.finish(len(indices), _manifest_fields("test", image_size, seed)).written
    retrieval.finish(len(indices), _manifest_fields("retrieval", image_size, seed))
    (out_dir / "test" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n", encoding="utf-8")
    (out_dir / "test" / "templates.txt").write_text("\n".join(ZERO_SHOT_TEMPLATES) + "\n", encoding="utf-8")
    return written


def build_demo(out_dir: Path, image_size: int = 32, seed: int = 0, overwrite: bool = False) -> dict[str, int]:
    """Write the whole demo; returns sample counts per split."""
    prepare_demo_dir(out_dir, overwrite)
    images, labels = load_digit_images()
    train_indices, test_indices = split_indices(labels, seed)
    train_count = write_train(out_dir / "train", images, labels, train_indices, image_size, seed)
    test_count = write_held_out(out_dir, images, labels, test_indices, image_size, seed)
    return {"train": train_count, "test": test_count, "retrieval": test_count}
