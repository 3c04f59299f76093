"""Image decoding and preprocessing, shared by the model build and the service.

The build trains and evaluates on exactly what this module produces, and the service classifies
exactly what it produces, so the two cannot drift apart. It is also the safe input contract:
every way an upload can be hostile ends in InvalidImage (415) or ImageTooLarge (413).

Memory is bounded by construction. The pixel cap alone does not bound bytes: a 113 kB 16-bit
PNG of 7071x7071 used to take 1.2 GiB on its way through float64 arrays. So each image's decode
cost in bytes is computed from its header (pixels x the peak bytes per pixel this module needs for
that mode, JPEGs at their draft scale) and refused above `max_bytes` before any pixel is decoded;
16- and 32-bit data is scaled with integer arithmetic; and the decoded image is shrunk with a
cheap box reduction before any full-size conversion (alpha compositing, mode changes). What the
container around the pixels costs to parse (segments, chunks, scans) is bounded before any
parser sees the bytes: service/image_structure.py.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from catdog_core.preprocessing import to_array
from service.errors import ImageTooLarge, InvalidImage
from service.image_structure import DEFAULT_MAX_JPEG_SCANS, refuse_costly_structure

# Decoders we accept. Everything else (PSD, EPS, ICO, ...) is refused before any decoding.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_DECODE_BYTES = 200 * 1024 * 1024

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# Peak bytes per pixel while decode() handles a full-size image of the mode, measured (VmHWM of a
# fresh process decoding a 4000x4000 image; bench/hostile_memory.py re-measures them): Pillow's own
# storage (1 byte for L/P/1, 2 for I;16, 4 for RGB and every other multi-band or 32-bit mode), plus
# the full-size copies that follow: premultiplied alpha in Image.reduce for RGBA/LA, the RGBA
# conversion of a transparent P image, numpy's copy of 16/32-bit data. libwebp decodes into a
# buffer of its own before Pillow copies it, so WebP costs 16 whatever the mode; BMP and GIF
# measured a few percent over their mode's figure and are rounded up.
_PEAK_BYTES_PER_PIXEL = {
    "1": 2,
    "L": 1,
    "P": 9,
    "PA": 9,
    "LA": 8,
    "RGBA": 8,
    "I": 12,
    "I;16": 6,
    "I;16L": 6,
    "I;16B": 6,
    "I;16N": 6,
}
_DEFAULT_PEAK_BYTES_PER_PIXEL = 4
_PEAK_BYTES_PER_PIXEL_BY_FORMAT = {"WEBP": 16, "BMP": 5, "GIF": 10}
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost to decode: decoded pixels, peak bytes (see the module doc), and the
    scans of a JPEG (service/image_structure.py: its decoding time grows with scans x pixels)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS


def decode_cost_bytes(mode: str, size: tuple[int, int], image_format: str | None = None) -> int:
    per_pixel = _PEAK_BYTES_PER_PIXEL_BY_FORMAT.get(image_format or "", 0) or _PEAK_BYTES_PER_PIXEL.get(
        mode, _DEFAULT_PEAK_BYTES_PER_PIXEL
    )
    return size[0] * size[1] * per_pixel


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open the header only and refuse what is too large or not allowed before decoding."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; we want an error instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"not a decodable image; accepted formats: {', '.join(ALLOWED_FORMATS)}") from exc
    except Exception as exc:  # OSError, ValueError, SyntaxError, and whatever else a parser raises
        raise InvalidImage(f"corrupt image header: {type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage("image has no pixels")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return image


def _scaled_to_eight_bits(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey scaled into 0..255 by the full scale of the smallest integer width that
    holds the data (Pillow's convert() would clamp at 255, a cast would wrap), in integers."""
    wide = np.array(image)  # one full-size copy; Pillow's I;16 cannot be reduced first
    if wide.min(initial=0) < 0:
        raise InvalidImage("negative pixel values are not supported")
    if image.mode in _SIXTEEN_BIT_MODES:
        bits = 16
    else:
        peak = int(wide.max(initial=0))
        bits = next(b for b in (8, 16, 31) if peak < 2**b)
    np.right_shift(wide, bits - 8, out=wide)
    return Image.fromarray(wide.astype(np.uint8), mode="L")


def _shrink(image: Image.Image, target_size: tuple[int, int]) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps the image at least target_size, so the
    full-size conversions after this never happen (JPEGs are already drafted near the target)."""
    factor = min(image.width // target_size[0], image.height // target_size[1])
    return image.reduce(factor) if factor >= 2 and image.mode in _REDUCIBLE_MODES else image


def _to_rgb(image: Image.Image, target_size: tuple[int, int]) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB without clipping or dropping information."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        image = _scaled_to_eight_bits(image)
    elif image.mode == "F":
        raise InvalidImage("floating-point images are not supported")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    image = _shrink(image, target_size)
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def decode(data: bytes, target_size: tuple[int, int], limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode bytes into an upright RGB image, at least as large as target_size when possible.

    JPEGs are decoded with Image.draft at the smallest DCT scale that still covers target_size,
    which makes a 12 MP photo several times cheaper to decode with no visible loss after resizing.
    """
    if not data:
        raise InvalidImage("empty body: no image bytes were sent")
    refuse_costly_structure(data, limits.max_jpeg_scans)
    image = _open(data, limits.max_pixels)
    try:
        if image.format in ("JPEG", "MPO"):  # MPO: phone cameras' multi-picture JPEG
            image.draft(image.mode, target_size)
        cost = decode_cost_bytes(image.mode, image.size, image.format)
        if cost > limits.max_bytes:
            raise ImageTooLarge(
                f"decoding this {image.size[0]}x{image.size[1]} {image.mode} image needs about "
                f"{cost} bytes; the limit is {limits.max_bytes}"
            )
        image.seek(0)  # first frame of animations and multi-page TIFFs
        image.load()
    except (ImageTooLarge, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(str(exc)) from exc
    except Exception as exc:
        # Pillow reports truncated and corrupt data as OSError/ValueError/SyntaxError, but a
        # hostile file can reach other exceptions in its decoders: client bytes are never a 500.
        raise InvalidImage(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from exc
    image = _upright(image)
    try:
        return _to_rgb(image, target_size)
    except InvalidImage:
        raise
    except Exception as exc:
        raise InvalidImage(f"cannot convert the image to RGB: {type(exc).__name__}: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. A malformed EXIF block is refused (415) rather than ignored:
    classifying a photo the wrong way up without saying so would be a silent wrong answer."""
    try:
        # In place: without it Pillow returns a full-size copy even when there is nothing to turn
        # (measured: +200 MB for a 50 MP RGBA PNG).
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except Exception as exc:  # struct.error, TypeError, AttributeError, ... from the EXIF parser
        raise InvalidImage(
            f"malformed EXIF metadata ({type(exc).__name__}: {exc}); re-save the image without EXIF"
        ) from exc


def preprocess(
    data: bytes, target_size: tuple[int, int], limits: DecodeLimits = DecodeLimits()
) -> np.ndarray:
    """Bytes in, model input row out: the one path both the build and the service use."""
    return to_array(decode(data, target_size, limits), target_size)
