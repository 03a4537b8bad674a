"""Shipped class names and templates (clip_train.eval.known_datasets) against their sources:
CLIP_benchmark's JSON files and builder, open_clip's ImageNet metadata; lookup errors; packaging."""
import json
import tomllib
from collections import Counter
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from clip_train.eval import known_datasets as kd
from clip_train.eval.loading import EvalError

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_COUNTS = {
    "imagenet1k": 1000, "cifar10": 10, "cifar100": 100, "stl10": 10, "food101": 101, "pets": 37,
    "flowers": 102, "caltech101": 102, "dtd": 47, "eurosat": 10, "gtsrb": 43, "sun397": 397, "cars": 196,
    "fgvc_aircraft": 100, "mnist": 10, "country211": 211, "renderedsst2": 2, "fer2013": 7, "voc2007": 20,
    "voc2007_multilabel": 20, "resisc45": 45, "svhn": 10, "pcam": 2,
    # the tfds-labelled VTAB tasks (see SOURCES.md)
    "vtab/cifar10": 10, "vtab/cifar100": 100, "vtab/dtd": 47, "vtab/resisc45": 45, "vtab/flowers": 102,
    "vtab/smallnorb_label_azimuth": 18, "vtab/smallnorb_label_elevation": 9,
    "vtab/dsprites_label_orientation": 40, "vtab/dsprites_label_x_position": 32,
}

# en_classnames.json key that CLIP_benchmark's build_vtab_dataset passes for each VTAB task that
# takes its names from that file (the rest are named by tensorflow-datasets).
VTAB_BENCHMARK_KEYS = {
    "vtab/caltech101": "caltech101_vtab", "vtab/clevr_count_all": "clevr_count_all",
    "vtab/clevr_closest_object_distance": "clevr_closest_object_distance",
    "vtab/diabetic_retinopathy": "diabetic_retinopathy", "vtab/dmlab": "dmlab", "vtab/eurosat": "eurosat",
    "vtab/kitti_closest_vehicle_distance": "kitti_closest_vehicle_distance", "vtab/pets": "pets",
    "vtab/pcam": "pcam", "vtab/svhn": "svhn",
}


@pytest.fixture(scope="module")
def benchmark():
    """CLIP_benchmark's (class names, templates) JSON files, as it packages them."""
    pytest.importorskip("clip_benchmark")
    data = resources.files("clip_benchmark.datasets")
    return tuple(json.loads(data.joinpath(f).read_text(encoding="utf-8"))
                 for f in ("en_classnames.json", "en_zeroshot_classification_templates.json"))


def classification_names():
    return [n for n in kd.known_names() if n not in kd.RETRIEVAL_DATASETS]


def test_names_equal_clip_benchmark_where_it_has_them(benchmark):
    classnames, _ = benchmark
    shared = [n for n in classification_names() if n in classnames]
    assert {"imagenet1k", "caltech101", "flowers", "pets", "eurosat", "gtsrb", "mnist", "country211",
            "fer2013", "pcam", "svhn"} <= set(shared)
    for name in shared:
        assert kd.classification_metadata(name)[0] == classnames[name], name


def test_vtab_names_use_the_keys_clip_benchmark_passes(benchmark):
    classnames, _ = benchmark
    for name, key in VTAB_BENCHMARK_KEYS.items():
        assert kd.classification_metadata(name)[0] == classnames[key], name


def test_templates_equal_clip_benchmark(benchmark):
    _, templates = benchmark
    for name in classification_names():
        short = name.removeprefix("vtab/")
        # CLIP_benchmark's own lookup order: the name, the name without vtab/, then ImageNet's
        key = next(k for k in (name, short, "imagenet1k") if k in templates)
        assert key != "imagenet1k" or name == "imagenet1k", f"{name} fell back to ImageNet's templates"
        assert kd.classification_metadata(name)[1] == templates[key], name


def test_every_clip_benchmark_vtab_set_is_shipped():
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    vtab = [n for n in builder.dataset_collection["vtab"] if n.startswith("vtab/")]
    assert len(vtab) == 18
    assert set(vtab) | {"vtab/cifar10"} <= set(kd.known_names())


def test_voc_names_are_clip_benchmark_label_order():
    voc2007 = pytest.importorskip("clip_benchmark.datasets.voc2007")
    for name in ("voc2007", "voc2007_multilabel"):
        assert kd.classification_metadata(name)[0] == list(voc2007.object_categories)


def test_imagenet_equals_open_clip_and_wnids_equal_clip_benchmark():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    names, templates = kd.classification_metadata("imagenet1k")
    assert names == list(IMAGENET_CLASSNAMES)
    assert templates == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    wnids = kd.imagenet_wnids()
    assert wnids == list(builder.all_imagenet_wordnet_ids)
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000


@pytest.mark.parametrize("name,count", sorted(EXPECTED_COUNTS.items()))
def test_class_counts(name, count):
    assert len(kd.classification_metadata(name)[0]) == count


def test_imagenet_has_80_templates():
    assert len(kd.classification_metadata("imagenet1k")[1]) == 80


def test_tfds_named_vtab_sets():
    def names(n):
        return kd.classification_metadata(n)[0]

    # tfds keeps CIFAR-100's and RESISC45's raw label names, with underscores
    assert names("vtab/cifar100") == [c.replace(" ", "_") for c in names("cifar100")]
    assert "aquarium_fish" in names("vtab/cifar100") and "aquarium fish" in names("cifar100")
    assert names("vtab/resisc45") == [c.replace(" ", "_") for c in names("resisc45")]
    assert names("vtab/cifar10") == names("cifar10") and names("vtab/dtd") == names("dtd")
    # tfds oxford_flowers102 differs from CLIP's flowers names in three places
    changed = {(a, b) for a, b in zip(names("flowers"), names("vtab/flowers")) if a != b}
    assert changed == {("globe flower", "globe-flower"), ("pink and yellow dahlia", "pink-yellow dahlia?"),
                       ("air plant", "ball moss")}
    assert names("vtab/smallnorb_label_azimuth") == [str(i) for i in range(18)]
    assert names("vtab/dsprites_label_x_position") == [str(i) for i in range(32)]


def test_every_template_has_a_class_field_and_formats():
    for name in classification_names():
        templates = kd.classification_metadata(name)[1]
        assert templates, name
        for template in templates:
            assert "{c}" in template, (name, template)
            assert "CLASS" in template.format(c="CLASS"), (name, template)  # no other fields, no stray braces


def test_no_empty_or_duplicate_names_unless_the_source_has_them(benchmark):
    classnames, _ = benchmark
    for name in classification_names():
        names = kd.classification_metadata(name)[0]
        empty = [n for n in names if not n.strip()]
        repeated = [n for n, k in Counter(names).items() if k > 1]
        if empty or repeated:
            # kept only when copied unchanged from CLIP_benchmark (ImageNet's two "missile"s and
            # "sunglasses", CLEVR distance's "" class), so results stay comparable
            assert names in classnames.values(), (name, empty, repeated)


def test_unknown_name_lists_the_known_ones_on_one_line():
    with pytest.raises(EvalError) as caught:
        kd.classification_metadata("foo")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("unknown dataset 'foo'; known datasets: ")
    assert message.endswith(", ".join(kd.known_names()))
    for name in ("cifar10", "imagenet1k", "vtab/dtd", "mscoco_captions"):
        assert name in message
    with pytest.raises(EvalError, match="unknown dataset"):
        kd.default_task("Cifar10")  # names are case-sensitive, as CLIP_benchmark's are
    with pytest.raises(EvalError, match=r"^unknown dataset 'a\\nb'"):
        kd.default_task("a\nb")


def test_wds_prefix_resolves_like_the_plain_name():
    assert kd.canonical_name("wds/cifar10") == "cifar10"
    assert kd.canonical_name("wds/vtab/dtd") == "vtab/dtd"
    assert kd.canonical_name("vtab/dtd") == "vtab/dtd"
    assert kd.is_known("wds/cifar10") and kd.is_known("cifar10") and not kd.is_known("wds/foo")
    assert kd.classification_metadata("wds/cifar10") == kd.classification_metadata("cifar10")
    assert kd.default_task("wds/flickr30k") == "zeroshot_retrieval"


def test_default_tasks():
    assert [kd.default_task(n) for n in kd.RETRIEVAL_DATASETS] == ["zeroshot_retrieval"] * 3
    assert kd.default_task("voc2007_multilabel") == "zeroshot_multilabel"
    assert kd.default_task("voc2007") == "zeroshot_classification"
    assert kd.default_task("vtab/pcam") == "zeroshot_classification"


def test_retrieval_sets_have_no_class_names():
    assert set(kd.RETRIEVAL_DATASETS) <= set(kd.known_names())
    with pytest.raises(EvalError, match="retrieval dataset with no class names"):
        kd.classification_metadata("mscoco_captions")


def test_known_names_sorted_and_results_are_copies():
    names = kd.known_names()
    assert names == sorted(names) and len(names) == len(set(names))
    classes, templates = kd.classification_metadata("cifar10")
    classes.append("x")
    templates.clear()
    classes, templates = kd.classification_metadata("cifar10")
    assert len(classes) == 10 and len(templates) == 18


def test_metadata_is_package_data_that_pip_install_ships():
    from setuptools import find_packages

    resource = resources.files(kd.METADATA_PACKAGE).joinpath(kd.CLASSIFICATION_FILE)
    assert resource.is_file() and json.loads(resource.read_text(encoding="utf-8"))
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # setuptools ships only packages that packages.find discovers, and from each only package-data matches
    found = find_packages(where=str(ROOT), include=config["packages"]["find"]["include"])
    assert kd.METADATA_PACKAGE in found
    patterns = config["package-data"].get("*", []) + config["package-data"].get(kd.METADATA_PACKAGE, [])
    assert any(fnmatch(kd.CLASSIFICATION_FILE, p) for p in patterns)
