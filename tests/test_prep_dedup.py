"""clip-prep dedup: planted exact and near duplicates are removed, nothing else is; kept samples are
copied byte for byte; the band index finds what a comparison with every kept hash finds."""
from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from data_prep.dedup import DEFAULT_NEAR_THRESHOLD, NearIndex, perceptual_hash
from data_prep.writer import TarShard, shard_name
from prep_fixtures import image_bytes, read_json, read_shards, run_cli, write_pair

SIDE = 96


def shape(kind: str, x: int, y: int, radius: int = 20) -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), (20, 60, 200))
    draw, box, red = ImageDraw.Draw(image), (x - radius, y - radius, x + radius, y + radius), (200, 30, 30)
    if kind == "circle":
        draw.ellipse(box, fill=red)
    elif kind == "square":
        draw.rectangle(box, fill=red)
    elif kind == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=red)
    else:  # a cross
        draw.rectangle((x - radius, y - radius // 4, x + radius, y + radius // 4), fill=red)
        draw.rectangle((x - radius // 4, y - radius, x + radius // 4, y + radius), fill=red)
    return image


def digit(character: str) -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), "white")
    ImageDraw.Draw(image).text((SIDE // 2, SIDE // 2), character, fill="black",
                               font=ImageFont.load_default(size=72), anchor="mm")
    return image


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


def distinct_images() -> dict[str, Image.Image]:
    """Distinct pictures, some of them alike (the ten digits in one font; a circle and a square at one place)."""
    images = {f"{kind}_{x}_{y}": shape(kind, x, y) for kind in ("circle", "square", "triangle", "cross")
              for x, y in ((30, 30), (60, 60), (30, 60))}
    images.update({f"digit_{c}": digit(c) for c in "0123456789"})
    images.update({f"noise_{seed}": noise(seed) for seed in range(3)})
    return images


def png(image: Image.Image) -> bytes:
    return image_bytes(image, "PNG")


def sample(key: str, image: bytes, caption: str, extension: str = "png") -> tuple[str, dict[str, bytes]]:
    meta = {"key": key, "source": f"{key}.{extension}", "caption": caption,
            "sha256": hashlib.sha256(image).hexdigest()}
    # An extra member ("cls") must travel with the sample like the others.
    return key, {extension: image, "txt": caption.encode(), "json": json.dumps(meta).encode(), "cls": b"3"}


def write_input(folder, samples, per_shard: int) -> None:
    """Samples into tars as `clip-prep shard` lays them out (sizes.json, manifest.json)."""
    folder.mkdir(parents=True)
    sizes = {}
    for start in range(0, len(samples), per_shard):
        shard = TarShard(folder / shard_name(len(sizes)))
        for key, members in samples[start:start + per_shard]:
            shard.add(key, members)
        shard.close()
        sizes[shard.path.name] = len(samples[start:start + per_shard])
    (folder / "sizes.json").write_text(json.dumps(sizes))
    (folder / "manifest.json").write_text(json.dumps({"tool": "clip-prep", "written": len(samples)}))


def member_names(folder) -> list[str]:
    names = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def removed(out) -> dict[str, dict]:
    return {line["key"]: line for line in map(json.loads, (out / "removed.jsonl").read_text().splitlines())}


def planted_dataset():
    """Distinct pictures with copies planted after their originals, some in a later shard:
    (samples, {copy key: (reason, original key)}, {copy key: phash distance to the original})."""
    images = distinct_images()
    samples = [sample(name, png(image), f"a picture of {name}") for name, image in images.items()]
    def jpeg(image, quality):
        return image_bytes(image, "JPEG", quality=quality)

    def brighter(image):
        return png(ImageEnhance.Brightness(image).enhance(1.02))

    variants = {  # copy key: (reason, original, bytes, extension)
        "copy_of_digit_3": ("exact_duplicate", "digit_3", png(images["digit_3"]), "png"),
        "jpeg50_square": ("near_duplicate", "square_30_30", jpeg(images["square_30_30"], 50), "jpg"),
        "resized_cross": ("near_duplicate", "cross_60_60", jpeg(images["cross_60_60"].resize((88, 88)), 90), "jpg"),
        "brighter_noise": ("near_duplicate", "noise_2", brighter(images["noise_2"]), "png"),
        "brighter_digit_5": ("near_duplicate", "digit_5", brighter(images["digit_5"]), "png"),
    }
    for key, (_, original, data, extension) in variants.items():  # 7 samples later: often in the next shard
        after = next(i for i, (name, _) in enumerate(samples) if name == original) + 7
        samples.insert(after, sample(key, data, f"another picture of {original}", extension))
    expected = {key: (reason, original) for key, (reason, original, _, _) in variants.items()}
    hashes = {key: perceptual_hash(members.get("png") or members["jpg"]) for key, members in samples}
    distances = {key: (hashes[key] ^ hashes[original]).bit_count() for key, (_, original) in expected.items()}
    return samples, expected, distances


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dedup") / "shards"
    samples, expected, distances = planted_dataset()
    write_input(folder, samples, per_shard=9)
    return folder, samples, expected, distances


def test_removes_the_planted_duplicates_and_nothing_else(planted, tmp_path, capsys):
    folder, samples, expected, distances = planted
    out = tmp_path / "out"
    assert run_cli("dedup", folder, "--out", out, "--samples-per-shard", 7) == 0
    # The planted near duplicates are near, yet some distinct pictures are alike too.
    hashes = {key: perceptual_hash(members.get("png") or members["jpg"]) for key, members in samples}
    distinct = [key for key, _ in samples if key not in expected]
    closest = min((hashes[a] ^ hashes[b]).bit_count() for i, a in enumerate(distinct) for b in distinct[i + 1:])
    assert all(d <= DEFAULT_NEAR_THRESHOLD for d in distances.values()) and DEFAULT_NEAR_THRESHOLD < closest <= 12
    gone = removed(out)
    assert {key: (line["reason"], line["duplicate_of"]) for key, line in gone.items()} == expected
    assert all(gone[key]["distance"] == distances[key] for key, (reason, _) in expected.items()
               if reason == "near_duplicate")
    # Kept samples: the others, in input order, every member byte-identical and in the same order.
    inputs, kept = read_shards(folder), read_shards(out)
    assert list(kept) == [key for key, _ in samples if key not in expected]
    assert all(kept[key] == inputs[key] for key in kept)
    assert member_names(out) == [name for name in member_names(folder) if name.split(".")[0] not in expected]
    manifest, sizes = read_json(out / "manifest.json"), read_json(out / "sizes.json")
    assert manifest["command"] == "dedup" and manifest["inputs"] == len(samples)
    assert manifest["kept"] + manifest["removed"] == manifest["inputs"] and manifest["kept"] == len(kept)
    assert manifest["removed_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 4}
    full, rest = divmod(len(kept), 7)
    assert list(sizes.values()) == [7] * full + [rest] * (rest > 0)
    assert list(sizes) == [shard_name(i) for i in range(len(sizes))]
    assert f"{len(samples)} inputs -> {len(kept)} kept, 5 removed" in capsys.readouterr().out


def test_threshold_zero_removes_identical_hashes_only(planted, tmp_path):
    folder, _, expected, distances = planted
    out = tmp_path / "out"
    assert run_cli("dedup", folder, "--out", out, "--near-threshold", 0) == 0
    want = {key for key, (reason, _) in expected.items() if reason == "exact_duplicate" or distances[key] == 0}
    assert set(removed(out)) == want and 0 < len(want) < len(expected)  # some planted copies hash differently


def test_rerun_with_overwrite_writes_the_same_bytes(planted, tmp_path):
    folder = planted[0]
    out = tmp_path / "out"
    assert run_cli("dedup", folder, "--out", out) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    assert run_cli("dedup", folder, "--out", out) == 2  # not empty
    assert run_cli("dedup", folder, "--out", out, "--overwrite") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"} == first


def brute_force(kept: list[tuple[str, int]], value: int, threshold: int):
    best = None
    for key, other in kept:
        distance = (value ^ other).bit_count()
        if distance <= threshold and (best is None or distance < best[1]):
            best = (key, distance)
    return best


@pytest.mark.parametrize("threshold", [0, 1, 3, 4, 7, 16])
def test_band_index_finds_what_comparing_with_all_finds(threshold):
    rng = random.Random(threshold)
    centres = [rng.getrandbits(64) for _ in range(40)]
    index, kept, found = NearIndex(threshold), [], 0
    for i in range(1500):  # hashes clustered around a few centres, at distances up to twice the threshold
        value = rng.choice(centres)
        for bit in rng.sample(range(64), rng.randint(0, 2 * threshold + 1)):
            value ^= 1 << bit
        got = index.nearest(value)
        assert got == brute_force(kept, value, threshold)
        found += got is not None
        if got is None:
            index.add(value, f"k{i}")
            kept.append((f"k{i}", value))
    assert found > 100  # the clusters really produce near matches


def test_shards_without_images_are_deduplicated_exactly(tmp_path, capsys):
    """Audio-like samples, and no sha256 in KEY.json: the members' own bytes decide."""
    rng = np.random.default_rng(0)
    clips = [rng.bytes(200) for _ in range(6)]
    samples = []
    for i, clip in enumerate(clips + [clips[1], clips[4]]):
        key = f"{i:012d}"
        samples.append((key, {"flac": clip, "txt": b"a sound", "json": json.dumps({"key": key}).encode()}))
    folder, out = tmp_path / "audio", tmp_path / "out"
    write_input(folder, samples, per_shard=5)
    assert run_cli("dedup", folder, "--out", out) == 0
    assert {key: line["duplicate_of"] for key, line in removed(out).items()} == {f"{6:012d}": f"{1:012d}",
                                                                                 f"{7:012d}": f"{4:012d}"}
    assert "exact deduplication only" in capsys.readouterr().out
    assert read_json(out / "manifest.json")["exact_only"]["without_image"] == 6


def test_after_clip_prep_shard(tmp_path):
    """On real `clip-prep shard` output: a copied source file (same sha256) and a re-encoded one."""
    source, shards, out = tmp_path / "source", tmp_path / "shards", tmp_path / "out"
    images = distinct_images()
    for name in ("circle_30_30", "digit_2", "digit_7", "noise_0"):
        write_pair(source, f"{name}.png", png(images[name]), f"a picture of {name}")
    write_pair(source, "z_copy.png", png(images["digit_7"]), "the same file again")
    write_pair(source, "z_jpeg.jpg", image_bytes(images["circle_30_30"], "JPEG", quality=50), "re-encoded")
    assert run_cli("shard", source, "--out", shards, "--image-size", SIDE, "--workers", 1) == 0
    assert run_cli("dedup", shards, "--out", out) == 0
    inputs = read_shards(shards)
    by_source = {Path(json.loads(members["json"])["source"]).name: key for key, members in inputs.items()}
    gone = removed(out)
    assert {key: (line["reason"], line["duplicate_of"]) for key, line in gone.items()} == {
        by_source["z_copy.png"]: ("exact_duplicate", by_source["digit_7.png"]),
        by_source["z_jpeg.jpg"]: ("near_duplicate", by_source["circle_30_30.png"])}
    kept = read_shards(out)
    assert len(kept) == 4 and all(kept[key] == inputs[key] for key in kept)


@pytest.mark.parametrize("case", ["missing", "no_tars", "out_is_input", "threshold"])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case):
    folder, out = tmp_path / "shards", tmp_path / "out"
    if case != "missing":
        folder.mkdir()
    args = (folder, "--out", out)
    if case == "out_is_input":
        folder.rmdir()
        write_input(folder, [sample("a", png(noise(0)), "x")], per_shard=1)
        args = (folder, "--out", folder, "--overwrite")
    elif case == "threshold":
        args += ("--near-threshold", 65)
    assert run_cli("dedup", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-prep: error:") and err.count("\n") == 1
    assert not out.exists()
    if case == "out_is_input":
        assert (folder / "00000.tar").is_file()  # --overwrite did not touch the input
