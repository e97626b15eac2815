"""Opening a photo: the one place that turns image bytes into the RGB picture the model sees.

``open_image`` is called by the split (``bincounter/data/split.py``, which writes the training
shards) and by serving (``bincounter/serving/inference.py``), so both see the same picture:

- **Orientation.** Cameras and phones store a rotated photo with an EXIF ``Orientation`` tag
  instead of rotating the pixels; the tag is applied (``ImageOps.exif_transpose``), so a photo
  stored sideways is counted upright.
- **Modes.** 16-bit greyscale (``I;16*``, 32-bit ``I``) is scaled to 8 bits; converting it
  with ``convert("RGB")`` clips every value above 255 to white. Float images are refused.
- **Limits** (``ImageLimits``, for untrusted bytes) are checked before the expensive work:
  bytes, then the header's pixel count and aspect ratio, then the number of JPEG scans.
  A JPEG is decoded in draft mode (a DCT-domain downscale) when it is much larger than needed.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a client may send. Restricting them keeps PIL's rarer (and riskier) decoders,
# e.g. EPS via Ghostscript, away from network input.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# The largest real ABID photo is 733x992 = 0.73 Mpx (abid-dev and abid-sample, 311 photos);
# 4 Mpx is ~5x that and still admits a 2560x1440 camera frame.
DEFAULT_MAX_IMAGE_PIXELS = 4_000_000
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
# ABID photos are 4:3 or 3:4 (at most 1.35:1). A 1x3,000,000 px strip is an attack: the
# square resize of the eval transform would blow it up to millions of rows first.
DEFAULT_MAX_ASPECT_RATIO = 4.0
# A progressive JPEG from a camera or libjpeg has ~10 scans. Each scan is a full pass over
# the coefficients, so a file that repeats scans costs seconds of CPU for a few KB.
DEFAULT_MAX_JPEG_SCANS = 64
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What one untrusted image may cost to decode."""
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # from the header, before any pixel is decoded
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS


def open_image(data: bytes, *, formats: tuple[str, ...] = IMAGE_FORMATS, limits: ImageLimits | None = None,
               draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image, or raise ``ImageError`` naming the reason.

    Args:
        data: the encoded image.
        formats: the PIL formats accepted.
        limits: checked before decoding; ``None`` skips them (trusted input, e.g. the split).
        draft_size: a JPEG larger than needed is decoded at the smallest DCT scale
            (1/2, 1/4 or 1/8) whose short side is still >= ``draft_size``; ``None`` decodes in full.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if limits and len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb guard (Image.MAX_IMAGE_PIXELS) fails before any decoding; ours is below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise ImageError(f"the bytes are not an image in a supported format ({', '.join(formats)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image is too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL's header parsers raise many types for malformed files
        raise ImageError(f"the image header is malformed: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if limits:
        _check_limits(image, data, limits)
    try:
        if draft_size and image.format == "JPEG" and min(width, height) >= 2 * draft_size:
            scale = min(width, height) / draft_size
            image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        image.load()  # decode now, so a truncated or corrupt file fails here and not in the transform
        return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, struct.error, ...
        raise ImageError(f"the {image.format} image cannot be decoded, it is truncated or corrupt: "
                         f"{type(e).__name__}: {e}") from None


def _check_limits(image: Image.Image, data: bytes, limits: ImageLimits) -> None:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(f"the image is too large: {width}x{height} = {width * height} pixels, more than the limit "
                         f"of {limits.max_pixels} pixels (decompression-bomb guard)")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect_ratio:
        raise ImageError(f"the image is {width}x{height}, an aspect ratio of {aspect:.1f}:1, more than the limit "
                         f"of {limits.max_aspect_ratio:g}:1")
    if image.format == "JPEG":
        # 0xFFDA starts a scan. Inside entropy-coded data 0xFF is always followed by 0x00 or a
        # restart marker, so each occurrence is a scan header (an EXIF thumbnail's too: a slight overcount).
        scans = data.count(b"\xff\xda")
        if scans > limits.max_jpeg_scans:
            raise ImageError(f"the JPEG has {scans} scans, more than the limit of {limits.max_jpeg_scans} "
                             f"(a progressive JPEG from a camera has about 10)")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # Scale 0..65535 to 0..255; convert("RGB") would clip, turning a normal 16-bit photo white.
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ImageError("floating-point images (PIL mode F) are not supported; send 8- or 16-bit pixels")
    return image if image.mode == "RGB" else image.convert("RGB")
