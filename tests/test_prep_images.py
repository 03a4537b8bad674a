"""clip-prep shard on good and bad images: colour modes, EXIF, resize modes, rejections."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_prep.images import ImageOptions, decode_image, encode_image_sample, resize_image
from data_prep.samples import Encoded, Rejection

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import decode_jpeg, image_bytes, jpeg_bytes, noise_image, png_bytes, read_json, read_rejects
    from prep_fixtures import read_shards, run_cli, write_pair
except ImportError:
    from tests.prep_fixtures import decode_jpeg, image_bytes, jpeg_bytes, noise_image, png_bytes, read_json
    from tests.prep_fixtures import read_rejects, read_shards, run_cli, write_pair

EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # "rotate 90 CW to display": a stored 40x20 image is shown as 20x40


def corrupt_jpeg_header() -> bytes:
    """A JPEG whose start-of-scan segment length is garbage: PIL opens it, libjpeg fails."""
    data = bytearray(jpeg_bytes())
    start_of_scan = data.index(b"\xff\xda")
    data[start_of_scan + 2 : start_of_scan + 4] = b"\x00\x00"
    return bytes(data)


def half_red_half_transparent() -> bytes:
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0, 255)
    return image_bytes(Image.fromarray(pixels, "RGBA"), "PNG")


def palette_with_transparent_black() -> bytes:
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255])
    return image_bytes(palette_image, "PNG", transparency=0)


def mid_gray_16_bit() -> bytes:
    return image_bytes(Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)), "PNG")


def cyan_cmyk_jpeg() -> bytes:
    return image_bytes(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)


def rotated_by_exif() -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    return image_bytes(noise_image(40, 20), "JPEG", exif=exif)


GOOD = {
    "good.jpg": jpeg_bytes,
    "cmyk.jpg": cyan_cmyk_jpeg,
    "rgba.png": half_red_half_transparent,
    "palette.png": palette_with_transparent_black,
    "gray16.png": mid_gray_16_bit,
    "exif.jpg": rotated_by_exif,
}
BAD = {  # name: (bytes, caption, expected reason)
    "corrupt_header.jpg": (corrupt_jpeg_header, "c", "unreadable_image"),
    "cut.jpg": (lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], "c", "truncated_image"),
    "truncated.png": (lambda: png_bytes()[: len(png_bytes()) // 2], "c", "truncated_image"),
    "empty.jpg": (lambda: b"", "c", "empty_file"),
    "text.jpg": (lambda: b"this is a text file\n", "c", "not_an_image"),
    "no_sidecar.jpg": (jpeg_bytes, None, "missing_caption"),
    "blank_caption.jpg": (jpeg_bytes, " \n", "empty_caption"),
    "huge.png": (lambda: png_bytes(200, 200), "c", "too_many_pixels"),
}
MAX_PIXELS = 20_000  # every GOOD image is far below; huge.png (40,000) is above


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One shard run over a folder mixing every kind of good and bad input."""
    folder = tmp_path_factory.mktemp("mixed")
    sources = {}
    for name, make in GOOD.items():
        sources[name] = write_pair(folder / "in", name, make(), f"caption of {name}")
    for name, (make, caption, _) in BAD.items():
        sources[name] = write_pair(folder / "in", name, make(), caption)
    (folder / "in" / "orphan.txt").write_text("a caption with no image")
    out = folder / "out"
    exit_code = run_cli("shard", folder / "in", "--out", out, "--image-size", 16, "--max-pixels", MAX_PIXELS, "--workers", 1)
    assert exit_code == 0
    samples = {json.loads(s["json"])["source"]: s for s in read_shards(out).values()}
    by_name = {path.name: samples.get(str(path)) for name, path in sources.items()}
    return out, sources, by_name


def test_every_input_is_written_or_rejected_for_the_right_reason(mixed_run):
    out, sources, by_name = mixed_run
    manifest = read_json(out / "manifest.json")
    assert (manifest["inputs"], manifest["written"], manifest["rejected"]) == (15, 6, 9)
    assert sum(read_json(out / "sizes.json").values()) == manifest["written"]

    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in read_rejects(out)}
    expected = {name: reason for name, (_, _, reason) in BAD.items()} | {"orphan.txt": "missing_image"}
    assert reasons == expected
    assert manifest["rejected_by_reason"] == {
        "empty_caption": 1, "empty_file": 1, "missing_caption": 1, "missing_image": 1,
        "not_an_image": 1, "too_many_pixels": 1, "truncated_image": 2, "unreadable_image": 1,
    }
    assert {name for name, sample in by_name.items() if sample is not None} == set(GOOD)


def test_truncation_is_detected_even_if_someone_enabled_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    result = decode_image(png_bytes()[:200], max_pixels=10**6)
    assert isinstance(result, Rejection) and result.reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the rest of the process


def test_decompression_bomb_is_a_rejection_and_pil_limit_is_restored():
    before = Image.MAX_IMAGE_PIXELS
    result = decode_image(png_bytes(200, 200), max_pixels=100)  # > 2x the limit: PIL raises itself
    assert isinstance(result, Rejection) and result.reason == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == before


def test_written_members_decode_and_metadata_matches_the_source(mixed_run):
    _, sources, by_name = mixed_run
    for name in GOOD:
        sample = by_name[name]
        image = decode_jpeg(sample["jpg"])
        assert image.mode == "RGB" and min(image.size) == 16
        metadata = json.loads(sample["json"])
        assert metadata["sha256"] == hashlib.sha256(sources[name].read_bytes()).hexdigest()
        assert metadata["caption"] == sample["txt"].decode() == f"caption of {name}"
        assert len(metadata["key"]) == 12 and metadata["key"].isdigit()


def center_color(sample, x: int, y: int) -> np.ndarray:
    return np.asarray(decode_jpeg(sample["jpg"]), dtype=int)[y, x]


def test_colour_modes_are_converted_sensibly(mixed_run):
    _, _, by_name = mixed_run
    assert np.allclose(center_color(by_name["cmyk.jpg"], 8, 8), (0, 255, 255), atol=12)
    assert np.allclose(center_color(by_name["rgba.png"], 3, 8), (255, 0, 0), atol=12)  # opaque red stays red
    assert np.allclose(center_color(by_name["rgba.png"], 13, 8), (255, 255, 255), atol=12)  # transparent -> white
    assert np.allclose(center_color(by_name["palette.png"], 8, 8), (255, 255, 255), atol=12)  # not black
    gray = center_color(by_name["gray16.png"], 8, 8)
    assert np.allclose(gray, (128, 128, 128), atol=4)  # scaled from 16 bits, not clipped to white


def test_exif_orientation_is_applied(mixed_run):
    _, _, by_name = mixed_run
    sample = by_name["exif.jpg"]
    assert decode_jpeg(sample["jpg"]).size == (16, 32)  # stored 40x20, displayed 20x40
    metadata = json.loads(sample["json"])
    assert (metadata["width"], metadata["height"]) == (20, 40)


@pytest.mark.parametrize(
    "mode, expected_size", [("keep_ratio", (32, 16)), ("center_crop", (16, 16)), ("border", (16, 16))]
)
def test_resize_modes(mode, expected_size):
    result = encode_image_sample(png_bytes(40, 20), "caption", ImageOptions(image_size=16, resize_mode=mode))
    assert isinstance(result, Encoded)
    image = decode_jpeg(result.members["jpg"])
    assert image.size == expected_size
    pixels = np.asarray(image, dtype=int)
    if mode == "border":  # 40x20 -> 16x8 content, white bands of 4 rows above and below
        assert np.all(pixels[:3] > 230) and np.all(pixels[-3:] > 230)
        assert pixels[5:11].mean() < 200  # the (mid-grey on average) content is in the middle
    assert (result.metadata["width"], result.metadata["height"]) == (40, 20)


def test_area_downscaling_is_the_mean_of_each_source_block():
    # A 4x4 checkerboard of black and white pixels shrunk 4x: area averaging gives mid-grey
    # everywhere (cv2.INTER_AREA, img2dataset's default, computes the same), Lanczos does not.
    board = np.indices((64, 64)).sum(axis=0) % 2 * 255
    source = Image.fromarray(np.stack([board] * 3, axis=-1).astype(np.uint8))
    area = np.asarray(resize_image(source, 16, "keep_ratio", "area"), dtype=float)
    lanczos = np.asarray(resize_image(source, 16, "keep_ratio", "lanczos"), dtype=float)
    assert np.abs(area - 127.5).max() <= 1
    assert not np.array_equal(area, lanczos)
    with pytest.raises(KeyError):
        resize_image(source, 16, "keep_ratio", "nearest")


def test_upscaling_keeps_smaller_side_exact():
    result = encode_image_sample(png_bytes(7, 5), "caption", ImageOptions(image_size=64))
    assert decode_jpeg(result.members["jpg"]).size == (90, 64)


def test_encode_accepts_a_path_and_reports_missing_files(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    assert isinstance(encode_image_sample(path, "x", ImageOptions(image_size=8)), Encoded)
    missing = encode_image_sample(tmp_path / "gone.png", "x", ImageOptions(image_size=8))
    assert missing == Rejection("missing_file", f"no such file: {tmp_path / 'gone.png'}")


def test_caption_is_stripped_and_written_as_utf8():
    result = encode_image_sample(jpeg_bytes(), "  un café, 猫  \n", ImageOptions(image_size=8))
    assert result.members["txt"] == "un café, 猫".encode("utf-8")
    assert result.metadata["caption"] == "un café, 猫"
