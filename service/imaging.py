"""Image decoding and preprocessing, shared by the model build and the service.

The build trains and evaluates on exactly what this module produces, and the service classifies
exactly what it produces, so the two cannot drift apart. It is also the safe input contract:
every way an upload can be hostile ends in InvalidImage (415) or ImageTooLarge (413).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage

# Decoders we accept. Everything else (PSD, EPS, ICO, ...) is refused before any decoding.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 50_000_000

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


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
        raise InvalidImage(
            f"not a decodable image; accepted formats: {', '.join(ALLOWED_FORMATS)}"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"corrupt image header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage("image has no pixels")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB without clipping or dropping information."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        # 16-bit data is scaled into 0..255; Pillow's own convert() would clamp it at 255.
        wide = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode != "I" or wide.max(initial=0) > 255 else 255.0
        if wide.min(initial=0) < 0:
            raise InvalidImage("negative pixel values are not supported")
        eight = np.rint(wide * (255.0 / full_scale)).astype(np.uint8)
        image = Image.fromarray(eight, mode="L")
    elif image.mode == "F":
        raise InvalidImage("floating-point images are not supported")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def decode(data: bytes, target_size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an upright RGB image, at least as large as target_size when possible.

    JPEGs are decoded with Image.draft at the smallest DCT scale that still covers target_size,
    which makes a 12 MP photo several times cheaper to decode with no visible loss after resizing.
    """
    if not data:
        raise InvalidImage("empty body: no image bytes were sent")
    image = _open(data, max_pixels)
    try:
        if image.format == "JPEG":
            image.draft(image.mode, target_size)
        image.seek(0)  # first frame of animations and multi-page TIFFs
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # Pillow reports truncated and corrupt data as OSError/ValueError/SyntaxError.
        raise InvalidImage(f"corrupt or truncated image: {exc}") from exc


def to_array(image: Image.Image, target_size: tuple[int, int]) -> np.ndarray:
    """Resize (squash) an RGB image to target_size=(width, height) and return HxWx3 uint8."""
    if image.size != target_size:
        image = image.resize(target_size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def preprocess(data: bytes, target_size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes in, model input row out: the one path both the build and the service use."""
    return to_array(decode(data, target_size, max_pixels), target_size)
