"""Helpers for the clip-prep tests: make images in memory, run the CLI, read shards back."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.cli import main


def image_bytes(image: Image.Image, fmt: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: compress badly, so cutting the file really removes image data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def jpeg_bytes(width: int = 24, height: int = 16, seed: int = 0) -> bytes:
    return image_bytes(noise_image(width, height, seed), "JPEG", quality=90)


def png_bytes(width: int = 24, height: int = 16, seed: int = 0) -> bytes:
    return image_bytes(noise_image(width, height, seed), "PNG")


def write_pair(folder: Path, name: str, data: bytes, caption: str | None) -> Path:
    """Write an image (and its STEM.txt sidecar unless caption is None)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def run_cli(*argv: str) -> int:
    return main([str(arg) for arg in argv])


def read_shards(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """All samples of an output folder, by key, in shard order: {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_rejects(out_dir: Path) -> list[dict]:
    lines = (out_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def decode_jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def output_files(out_dir: Path) -> dict[str, bytes]:
    """Every file of a clip-prep output by name, as bytes, for comparing two runs: manifest.json
    (its creation time) is left out and the timing fields of the shard stats are removed."""
    from data_prep.writer import TIMING_FIELDS

    files = {}
    for path in sorted(out_dir.iterdir()):
        if path.name == "manifest.json":
            continue
        data = path.read_bytes()
        if path.name.endswith("_stats.json"):
            stats = json.loads(data)
            data = json.dumps({k: v for k, v in stats.items() if k not in TIMING_FIELDS}, indent=2).encode()
        files[path.name] = data
    return files
