"""Image modality: decode defensively, normalise to RGB, resize like img2dataset, re-encode as JPEG.

Every failure becomes a `Rejection` with a reason code, never an exception, so one bad file
cannot stop a run of millions.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from data_prep.samples import (
    MODALITIES,
    Encoded,
    EncodeResult,
    MediaInput,
    Modality,
    Rejection,
    check_caption,
    read_media_bytes,
    sha256_hex,
)

RESIZE_MODES = ("keep_ratio", "center_crop", "border")
# Shrinking filters: Lanczos (sharpest) or area averaging (PIL's BOX: what img2dataset's default,
# cv2.INTER_AREA, computes; about 3x faster than Lanczos). Enlarging is always bicubic.
DOWNSCALE_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX}
# Same default as PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 89_478_485
# img2dataset's "border" mode pads with white; we do the same so outputs match.
BORDER_FILL = (255, 255, 255)
# Transparent pixels are composited on white: the usual look of a transparent logo or icon.
TRANSPARENT_BACKGROUND = (255, 255, 255, 255)

# File signatures of common image formats. A file that starts like an image but that PIL
# cannot identify is a corrupt image ("unreadable_image"), not "not_an_image".
_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
)


@dataclass(frozen=True)
class ImageOptions:
    """What `encode_image_sample` needs; plain data so it pickles into worker processes."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95
    # DataComp's basic filters (0: off): caption words, the image's shorter side, its aspect ratio
    min_words: int = 0
    min_side: int = 0
    max_aspect: float = 0.0
    downscale_filter: str = "lanczos"

    @classmethod
    def from_args(cls, args: Any) -> "ImageOptions":
        return cls(args.image_size, args.resize_mode, args.max_pixels, args.jpeg_quality,
                   args.min_words, args.min_side, args.max_aspect, args.downscale_filter)


def basic_filter(caption: str, width: int, height: int, options: ImageOptions) -> Rejection | None:
    """DataComp's basic filtering on a source pair (before any resize): too few caption words, a
    shorter side under min_side pixels, or a longer/shorter side ratio above max_aspect."""
    words = len(caption.split())
    if options.min_words and words < options.min_words:
        return Rejection("too_few_words", f"{words} caption words, --min-words is {options.min_words}")
    if options.min_side and min(width, height) < options.min_side:
        return Rejection("too_small", f"{width}x{height}: shorter side under --min-side {options.min_side}")
    aspect = max(width, height) / max(1, min(width, height))
    if options.max_aspect and aspect > options.max_aspect:
        return Rejection("too_elongated", f"{width}x{height}: aspect {aspect:.2f} over --max-aspect {options.max_aspect}")
    return None


@contextlib.contextmanager
def strict_pil_settings(max_pixels: int) -> Iterator[None]:
    """PIL's limits are process globals: set them for one decode and restore them after.

    LOAD_TRUNCATED_IMAGES must be False or PIL silently pads a truncated file with grey.
    MAX_IMAGE_PIXELS follows --max-pixels so PIL's own bomb guard agrees with ours.
    """
    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Oversized images are rejected explicitly below; the warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _looks_like_image(data: bytes) -> bool:
    is_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return is_webp or any(data.startswith(signature) for signature in _IMAGE_SIGNATURES)


def _unidentified(data: bytes) -> Rejection:
    if _looks_like_image(data):
        return Rejection("unreadable_image", "corrupt image header: PIL cannot parse it")
    return Rejection("not_an_image", "PIL does not recognise the file as an image")


def _decode_failure(stage: str, error: Exception) -> Rejection:
    # PIL reports a file cut short as "image file is truncated" (pixel data) or
    # "Truncated File Read" (headers); anything else is corrupt data.
    reason = "truncated_image" if "truncated" in str(error).lower() else "unreadable_image"
    return Rejection(reason, f"{stage}: {type(error).__name__}: {error}")


def decode_image(data: bytes, max_pixels: int) -> Image.Image | Rejection:
    """Open and fully decode an image, checking its pixel count from the header first."""
    with strict_pil_settings(max_pixels):
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            return Rejection("too_many_pixels", str(error))
        except UnidentifiedImageError:
            return _unidentified(data)
        except Exception as error:  # PIL raises many types for bad headers
            return _decode_failure("cannot open", error)
        width, height = image.size
        if width * height > max_pixels:
            return Rejection(
                "too_many_pixels",
                f"{width}x{height} = {width * height} pixels exceeds --max-pixels {max_pixels}",
            )
        try:
            image.load()  # forces the full decode, so truncation is detected here
        except Image.DecompressionBombError as error:
            return Rejection("too_many_pixels", str(error))
        except Exception as error:
            return _decode_failure("cannot decode", error)
    return image


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; a broken EXIF block leaves pixels as stored.

    An image that needs no turn is returned as it is: `exif_transpose` would copy it whole (a
    tenth of the time an image takes), and nothing downstream changes it in place."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
            return image
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def high_bit_depth_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit / 32-bit / float grayscale to 0..255 by its nominal range, not by clipping.

    A plain `convert("L")` clips 16-bit values at 255, turning almost any photo white.
    """
    values = pixels.astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16"):
        full_scale = 65535.0
    elif mode == "F" and peak <= 1.0:
        full_scale = 1.0
    elif peak <= 255.0:
        full_scale = 255.0
    elif peak <= 65535.0:
        full_scale = 65535.0
    else:
        full_scale = peak
    scaled = np.round(np.clip(values, 0.0, None) / full_scale * 255.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode.startswith("I") or image.mode == "F":
        gray = high_bit_depth_to_uint8(np.asarray(image), image.mode)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def resized_dimensions(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """Size after scaling: the smaller side becomes `size` (keep_ratio, center_crop) or the
    larger side does (border); the other side keeps the aspect ratio."""
    fit_smaller_side = mode != "border"
    width_governs = (width <= height) == fit_smaller_side
    if width_governs:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def resize_image(image: Image.Image, size: int, mode: str, downscale_filter: str = "lanczos") -> Image.Image:
    """Resize an RGB image the way img2dataset's resize modes do."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    new_width, new_height = resized_dimensions(*image.size, size, mode)
    if (new_width, new_height) != image.size:
        shrinking = new_width < image.width
        # Lanczos or area keep detail when shrinking; bicubic gives smooth upscales without ringing.
        resample = DOWNSCALE_FILTERS[downscale_filter] if shrinking else Image.Resampling.BICUBIC
        image = image.resize((new_width, new_height), resample, reducing_gap=3.0 if shrinking else None)
    if mode == "center_crop":
        left, top = (new_width - size) // 2, (new_height - size) // 2
        return image.crop((left, top, left + size, top + size))
    if mode == "border":
        canvas = Image.new("RGB", (size, size), BORDER_FILL)
        canvas.paste(image, ((size - new_width) // 2, (size - new_height) // 2))
        return canvas
    return image


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_image_sample(path_or_bytes: MediaInput, caption: str | None, options: ImageOptions) -> EncodeResult:
    """One (image, caption) input -> `Encoded` {jpg, txt} + metadata, or a `Rejection`.

    The image is checked before the caption so that a stray non-image file is reported as
    such, which says more than "missing caption".
    """
    data = read_media_bytes(path_or_bytes)
    if isinstance(data, Rejection):
        return data
    image = decode_image(data, options.max_pixels)
    if isinstance(image, Rejection):
        return image
    caption_problem = check_caption(caption)
    if caption_problem is not None:
        return caption_problem
    caption = caption.strip()
    upright = apply_exif_orientation(image)
    filtered = basic_filter(caption, upright.width, upright.height, options)
    if filtered is not None:
        return filtered
    try:
        rgb = to_rgb(upright)
        jpeg = encode_jpeg(resize_image(rgb, options.image_size, options.resize_mode, options.downscale_filter), options.jpeg_quality)
    except Exception as error:  # e.g. a colour mode PIL cannot convert (LAB, HSV)
        return Rejection("unconvertible_image", f"{upright.mode} image: {type(error).__name__}: {error}")
    metadata = {
        "caption": caption,
        "width": upright.width,  # as displayed, i.e. after EXIF orientation
        "height": upright.height,
        "sha256": sha256_hex(data),
    }
    return Encoded(members={"jpg": jpeg, "txt": caption.encode("utf-8")}, metadata=metadata)


MODALITIES.register("image")(Modality("image", ImageOptions.from_args, encode_image_sample))
