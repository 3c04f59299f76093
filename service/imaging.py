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
    except Exception as exc:  # OSError, ValueError, SyntaxError, and whatever else a parser raises
        raise InvalidImage(f"corrupt image header: {type(exc).__name__}: {exc}") from exc
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
        # 16- and 32-bit data is scaled into 0..255 by the full scale of the smallest integer
        # width that holds it; Pillow's own convert() would clamp at 255, a cast would wrap.
        wide = np.asarray(image, dtype=np.float64)
        if wide.min(initial=0) < 0:
            raise InvalidImage("negative pixel values are not supported")
        peak = wide.max(initial=0)
        full_scale = next(scale for scale in (255.0, 65535.0, 2.0**31 - 1) if peak <= scale)
        if image.mode in _SIXTEEN_BIT_MODES:
            full_scale = 65535.0
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
        if image.format in ("JPEG", "MPO"):  # MPO: phone cameras' multi-picture JPEG
            image.draft(image.mode, target_size)
        image.seek(0)  # first frame of animations and multi-page TIFFs
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from exc
    except Exception as exc:
        # Pillow reports truncated and corrupt data as OSError/ValueError/SyntaxError, but a
        # hostile file can reach other exceptions in its decoders: client bytes are never a 500.
        raise InvalidImage(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from exc
    image = _upright(image)
    try:
        return _to_rgb(image)
    except InvalidImage:
        raise
    except Exception as exc:
        raise InvalidImage(f"cannot convert the image to RGB: {type(exc).__name__}: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. A malformed EXIF block is refused (415) rather than ignored:
    classifying a photo the wrong way up without saying so would be a silent wrong answer."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception as exc:  # struct.error, TypeError, AttributeError, ... from the EXIF parser
        raise InvalidImage(f"malformed EXIF metadata ({type(exc).__name__}: {exc}); "
                           "re-save the image without EXIF") from exc


def to_array(image: Image.Image, target_size: tuple[int, int]) -> np.ndarray:
    """Resize (squash) an RGB image to target_size=(width, height) and return HxWx3 uint8."""
    if image.size != target_size:
        image = image.resize(target_size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def preprocess(data: bytes, target_size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes in, model input row out: the one path both the build and the service use."""
    return to_array(decode(data, target_size, max_pixels), target_size)
