"""Regenerate clip_train/eval/metadata/classification.json: class names and zero-shot templates.

Requirements:
- clip-benchmark==1.6.2 installed (``pip install -e '.[test]'``): its en_classnames.json,
  en_zeroshot_classification_templates.json, builder.py (ImageNet WordNet ids, the VTAB collection)
  and voc2007.py (the VOC class order);
- open_clip_torch installed: its ImageNet names and templates, to cross-check CLIP_benchmark's;
- a path to OpenAI CLIP's data/prompts.md (``git clone https://github.com/openai/CLIP``), for the
  sets whose names CLIP_benchmark takes from torchvision or tensorflow-datasets at run time.

Usage:
    python tools/build_eval_metadata.py --prompts CLIP/data/prompts.md          # writes the JSON
    python tools/build_eval_metadata.py --prompts CLIP/data/prompts.md --check  # exit 1 if it differs

Which source each dataset's names come from, and why, is in clip_train/eval/metadata/SOURCES.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from importlib import resources
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "clip_train" / "eval" / "metadata" / "classification.json"
TEMPLATE_FALLBACK = "imagenet1k"  # what CLIP_benchmark uses for a dataset its templates file lacks

# Datasets whose class names CLIP_benchmark reads from torchvision at run time (none in
# en_classnames.json): we take CLIP's names for them, by prompts.md section.
PROMPTS_SECTIONS = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "stl10": "STL10",
    "food101": "Food101",
    "sun397": "SUN397",
    "cars": "StanfordCars",
    "fgvc_aircraft": "FGVCAircraft",
    "dtd": "DescribableTextures",
    "renderedsst2": "SST2",
    "resisc45": "RESISC45",
}

# Datasets named in en_classnames.json under their own name.
BENCHMARK_NAMED = (
    "imagenet1k", "caltech101", "flowers", "pets", "eurosat", "gtsrb", "mnist", "country211",
    "fer2013", "pcam", "svhn",
)

# Both VOC sets are labelled by index into clip_benchmark.datasets.voc2007.object_categories, whose
# order is not prompts.md's, so the names must come from there.
VOC_DATASETS = ("voc2007", "voc2007_multilabel")

# VTAB tasks for which build_vtab_dataset passes a list from en_classnames.json (task -> key).
VTAB_BENCHMARK_KEYS = {
    "caltech101": "caltech101_vtab",
    "clevr_count_all": "clevr_count_all",
    "clevr_closest_object_distance": "clevr_closest_object_distance",
    "diabetic_retinopathy": "diabetic_retinopathy",
    "dmlab": "dmlab",
    "eurosat": "eurosat",
    "kitti_closest_vehicle_distance": "kitti_closest_vehicle_distance",
    "pets": "pets",
    "pcam": "pcam",
    "svhn": "svhn",
}

# VTAB tasks whose labels are bare tfds ClassLabel(num_classes=N): tfds names them "0".."N-1".
VTAB_NUMBERED = {
    "dsprites_label_orientation": 40,
    "dsprites_label_x_position": 32,
    "smallnorb_label_azimuth": 18,
    "smallnorb_label_elevation": 9,
}

# VTAB tasks named by tfds whose tfds names are CLIP's (prompts.md section), with spaces written as
# underscores where tfds does (tfds keeps the raw CIFAR-100 / RESISC45 label names).
VTAB_FROM_PROMPTS = {
    "cifar10": ("CIFAR10", False),
    "cifar100": ("CIFAR100", True),
    "dtd": ("DescribableTextures", False),
    "resisc45": ("RESISC45", True),
}

# tfds oxford_flowers102 (what vtab/flowers is labelled with) differs from CLIP_benchmark's
# "flowers" list in these three names only (CLIP_benchmark name -> tfds name).
TFDS_FLOWERS_DIFFERENCES = {
    "globe flower": "globe-flower",
    "pink and yellow dahlia": "pink-yellow dahlia?",
    "air plant": "ball moss",
}


def parse_prompts(text: str) -> dict[str, dict[str, list]]:
    """prompts.md -> {section title: {"classes": [...], "templates": [...]}}.

    Each `## Title` section holds one fenced code block of Python list assignments; the lists are
    read with ast.literal_eval, never executed.
    """
    sections = {}
    for match in re.finditer(r"^## (.+?)\s*\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        code = re.search(r"```\w*\n(.*?)```", match.group(2), re.S)
        if code is None:
            continue
        values = {}
        for node in ast.parse(code.group(1)).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                values[node.targets[0].id] = ast.literal_eval(node.value)
        sections[match.group(1)] = values
    return sections


def load_benchmark_sources():
    """CLIP_benchmark's (class names, templates, ImageNet wnids, VTAB dataset names, VOC classes)."""
    from clip_benchmark.datasets import builder, voc2007

    data = resources.files("clip_benchmark.datasets")
    classnames = json.loads(data.joinpath("en_classnames.json").read_text(encoding="utf-8"))
    templates = json.loads(data.joinpath("en_zeroshot_classification_templates.json").read_text(encoding="utf-8"))
    # "vtab" lists torchvision's sun397 among the vtab/ sets; vtab+ adds vtab/cifar10.
    vtab = [n for n in builder.dataset_collection["vtab+"] if n.startswith("vtab/")]
    return classnames, templates, list(builder.all_imagenet_wordnet_ids), vtab, list(voc2007.object_categories)


def vtab_classnames(task: str, benchmark: dict, prompts: dict) -> list[str]:
    """The class names CLIP_benchmark's build_vtab_dataset ends up with for `task`."""
    if task in VTAB_BENCHMARK_KEYS:
        return list(benchmark[VTAB_BENCHMARK_KEYS[task]])
    if task in VTAB_NUMBERED:
        return [str(i) for i in range(VTAB_NUMBERED[task])]
    if task in VTAB_FROM_PROMPTS:
        section, underscores = VTAB_FROM_PROMPTS[task]
        names = prompts[section]["classes"]
        return [n.replace(" ", "_") for n in names] if underscores else list(names)
    if task == "flowers":
        return [TFDS_FLOWERS_DIFFERENCES.get(n, n) for n in benchmark["flowers"]]
    raise SystemExit(f"no class-name source for vtab/{task}")


def templates_for(name: str, templates: dict) -> list[str]:
    """CLIP_benchmark's template lookup: the full name, then the name without its vtab/ prefix,
    then ImageNet's."""
    for key in (name, name.split("/", 1)[-1], TEMPLATE_FALLBACK):
        if key in templates:
            return list(templates[key])
    raise SystemExit(f"no templates for {name}")


def build(prompts_path: Path) -> dict:
    benchmark, templates, wnids, vtab_names, voc_classes = load_benchmark_sources()
    prompts = parse_prompts(prompts_path.read_text(encoding="utf-8"))
    classnames = {name: list(benchmark[name]) for name in BENCHMARK_NAMED}
    classnames.update({name: list(prompts[section]["classes"]) for name, section in PROMPTS_SECTIONS.items()})
    classnames.update({name: list(voc_classes) for name in VOC_DATASETS})
    classnames.update({name: vtab_classnames(name.split("/", 1)[1], benchmark, prompts) for name in vtab_names})
    table = {name: {"classnames": classnames[name], "templates": templates_for(name, templates)}
             for name in sorted(classnames)}
    table["imagenet1k"]["wnids"] = wnids
    check(table)
    return table


def check(table: dict) -> None:
    """Fail the build on data that the evaluator could not use or that disagrees with open_clip."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    imagenet = table["imagenet1k"]
    if imagenet["classnames"] != list(IMAGENET_CLASSNAMES):
        raise SystemExit("CLIP_benchmark's and open_clip's ImageNet class names differ")
    if imagenet["templates"] != [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]:
        raise SystemExit("CLIP_benchmark's and open_clip's ImageNet templates differ")
    if imagenet["wnids"] != sorted(imagenet["wnids"]) or len(imagenet["wnids"]) != len(imagenet["classnames"]):
        raise SystemExit("ImageNet wnids are not 1000 sorted ids")
    for name, entry in table.items():
        bad = [t for t in entry["templates"] if "{c}" not in t]
        if bad or not entry["classnames"]:
            raise SystemExit(f"{name}: no class names, or templates without {{c}}: {bad}")


def render(table: dict) -> str:
    return json.dumps(table, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True, help="OpenAI CLIP's data/prompts.md")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    text = render(build(args.prompts))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        print(f"{args.out}: {'up to date' if current == text else 'differs from the sources'}")
        return 0 if current == text else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(json.loads(text))} datasets to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
