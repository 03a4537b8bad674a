"""Train the demo model with each objective for the same budget and compare them in one table.

Usage (after ``clip-prep demo --out demo_data``)::

    python benchmarks/objectives.py --data demo_data --epochs 15 --out runs/objectives

Each objective is a recipe in ``configs/`` trained by ``clip-train`` in its own process (same seed,
data, steps). Then, on the held-out split: zero-shot top-1 (``demo_data/test``), image retrieval
R@1 (``demo_data/retrieval``), the modality gap ``‖mean(image embeddings) − mean(text embeddings)‖``
over the retrieval images and their first captions, and Wang & Isola's uniformity
``log mean_{i≠j} exp(−2‖x_i − x_j‖²)`` of each modality's embeddings (lower is more uniform).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clip_train.eval import (build_classification_set, build_retrieval_set, load_model, make_loader,  # noqa: E402
                             zeroshot_classification, zeroshot_retrieval)

OBJECTIVES = [
    ("CLIP (InfoNCE)", "demo.yaml"),
    ("+ intra-image", "demo-intra-image.yaml"),
    ("+ intra-text", "demo-intra-text.yaml"),
    ("+ embedding dropout", "demo-embed-dropout.yaml"),
    ("+ uniformity/alignment", "demo-uniformity.yaml"),
    ("DCL", "demo-dcl.yaml"),
    ("hard-negative (HN-NCE)", "demo-hard-negative.yaml"),
    ("CoCa (contrastive + caption)", "demo-coca.yaml"),
]


def train(config: str, data: Path, out: Path, epochs: int) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "clip_train.cli", "--config", str(ROOT / "configs" / config),
                    f"data.train={data / 'train'}", f"output_dir={out}", f"train.epochs={epochs}",
                    "eval.zeroshot=", "eval.retrieval=", "--overwrite"], check=True, capture_output=True, cwd=ROOT)
    return time.time() - started


@torch.no_grad()
def embeddings(loaded, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = [], []
    for batch_images, captions in make_loader(build_retrieval_set(data / "retrieval", loaded.preprocess), 128):
        images.append(loaded.model.encode_image(batch_images, normalize=True))
        texts.append(loaded.model.encode_text(loaded.tokenizer([c[0] for c in captions]), normalize=True))
    return torch.cat(images), torch.cat(texts)


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    squared = torch.cdist(x, x).pow(2)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool)
    return torch.log(torch.exp(-t * squared[off_diagonal]).mean()).item()


def evaluate(run: Path, data: Path) -> dict:
    loaded = load_model(str(run))
    dataset, classnames, templates = build_classification_set(data / "test", loaded.preprocess)
    zeroshot = zeroshot_classification(loaded.model, loaded.tokenizer, make_loader(dataset, 128), classnames,
                                       templates, "cpu")
    retrieval = zeroshot_retrieval(loaded.model, loaded.tokenizer,
                                   make_loader(build_retrieval_set(data / "retrieval", loaded.preprocess), 128), "cpu")
    image, text = embeddings(loaded, data)
    return {"acc1": zeroshot["acc1"], "r1": retrieval["image_retrieval_recall@1"],
            "gap": (image.mean(0) - text.mean(0)).norm().item(),
            "unif_image": uniformity(image), "unif_text": uniformity(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "objectives")
    args = parser.parse_args()
    rows = []
    for label, config in OBJECTIVES:
        run = args.out / Path(config).stem
        seconds = train(config, args.data.resolve(), run, args.epochs)
        rows.append((label, config, seconds, evaluate(run, args.data.resolve())))
        print(f"done: {label} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{args.epochs} epochs of the demo per objective, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU\n")
    print("| objective | recipe | zero-shot top-1 | image R@1 | modality gap | uniformity image / text | train s |")
    print("|---|---|---|---|---|---|---|")
    for label, config, seconds, m in rows:
        print(f"| {label} | `{config}` | {m['acc1']:.3f} | {m['r1']:.3f} | {m['gap']:.3f} | "
              f"{m['unif_image']:.2f} / {m['unif_text']:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
