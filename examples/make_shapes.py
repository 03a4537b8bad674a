"""A small captioned dataset to try the README's worked example on: coloured shapes.

Writes ``OUT/pairs.csv`` (filepath,caption; 300 pairs by default, paths relative to the CSV) with
the images under ``OUT/images/``, and ``OUT/my_classes/`` with held-out images of the 9 classes
(3 colours x 3 shapes) in one folder per class, as ``clip-eval`` reads a class-folder tree.

    python examples/make_shapes.py --out try && cd try    # then the README's commands
"""
from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
SHAPES = ("circle", "square", "triangle")
CAPTIONS = ("a {colour} {shape}", "a photo of a {colour} {shape}", "a {shape} coloured {colour}",
            "a {colour} {shape} on a plain background", "a drawing of a {colour} {shape}")


def draw(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    grey = rng.randint(200, 255)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    side = rng.randint(size // 3, size * 2 // 3)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=jitter)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=jitter)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=jitter)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write pairs.csv, images/ and my_classes/ into")
    parser.add_argument("--pairs", type=int, default=300, help="training pairs")
    parser.add_argument("--per-class", type=int, default=20, help="held-out images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "pairs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i in range(args.pairs):
            colour, shape = classes[i % len(classes)]
            draw(colour, shape, rng).save(out / "images" / f"{i:05d}.png")
            writer.writerow([f"images/{i:05d}.png", rng.choice(CAPTIONS).format(colour=colour, shape=shape)])
    for colour, shape in classes:
        folder = out / "my_classes" / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(colour, shape, rng).save(folder / f"{i:03d}.png")
    print(f"{args.pairs} pairs in {out / 'pairs.csv'}, {len(classes)} held-out classes in {out / 'my_classes'}")


if __name__ == "__main__":
    main()
