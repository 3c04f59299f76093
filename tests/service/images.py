"""Images made in code: well-formed ones in every accepted format and mode, and hostile ones."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from bench.hostile_images import (
    encode,
    gif_with_blocks_before_image,
    jpeg_with_header_flood,
    png_chunk,
    progressive_jpeg_scan_bomb,
    rle_bmp,
    tiff_with_strips,
)


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def jpeg(width: int = 96, height: int = 64) -> bytes:
    return encode(gradient(width, height), "JPEG", quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions with a tiny body: the header alone must be refused."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png_bomb(side: int = 12_000) -> bytes:
    """A real, fully valid PNG of side x side black pixels that compresses to a few hundred KB."""
    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")
    )


def png_with_chunks(chunk: bytes, count: int = 100_000, before_image_data: bool = False) -> bytes:
    """A small PNG with `count` copies of `chunk` before its first IDAT or before IEND: Pillow
    reads chunks one by one in Python (12 MB of empty chunks took 3 s)."""
    data = encode(gradient(), "PNG")
    at = data.index(b"IDAT") - 4 if before_image_data else data.rindex(b"IEND") - 4
    return data[:at] + chunk * count + data[at:]


def png_in_small_chunks(chunk_bytes: int = 1024) -> bytes:
    """A real photo-sized PNG whose image data is split into IDAT chunks of `chunk_bytes`: some
    encoders write small chunks, and such a file must not be taken for a chunk flood."""
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (400, 600, 3), np.uint8)), "PNG")
    header_end = data.index(b"IDAT") - 4
    image_data = b"".join(
        data[at + 8 : at + 8 + struct.unpack(">I", data[at : at + 4])[0]]
        for at in _png_chunk_offsets(data)
        if data[at + 4 : at + 8] == b"IDAT"
    )
    chunks = [
        png_chunk(b"IDAT", image_data[i : i + chunk_bytes]) for i in range(0, len(image_data), chunk_bytes)
    ]
    return data[:header_end] + b"".join(chunks) + png_chunk(b"IEND", b"")


def _png_chunk_offsets(data: bytes) -> list[int]:
    offsets, at = [], 8
    while at < len(data):
        offsets.append(at)
        at += 12 + struct.unpack(">I", data[at : at + 4])[0]
    return offsets


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    image = gradient(96, 64)
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes())


def valid_corpus() -> dict[str, bytes]:
    """Decodable inputs the service must classify (200), one per format and awkward mode."""
    base = gradient()
    return {
        "jpeg": jpeg(),
        "png": encode(base, "PNG"),
        "webp": encode(base, "WEBP"),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
        "gif": encode(base.convert("P"), "GIF"),
        "animated gif": animated_gif(),
        "cmyk jpeg": encode(base.convert("CMYK"), "JPEG"),
        "grayscale png": encode(base.convert("L"), "PNG"),
        "1-bit png": encode(base.convert("1"), "PNG"),
        "rgba png": encode(base.convert("RGBA"), "PNG"),
        "la png": encode(base.convert("LA"), "PNG"),
        "palette png with transparency": encode(base.convert("P"), "PNG", transparency=0),
        "16-bit png": sixteen_bit_png(),
        "exif rotated jpeg": exif_rotated_jpeg(),
        "1x1 png": encode(Image.new("RGB", (1, 1)), "PNG"),
        "very wide png": encode(Image.new("RGB", (4000, 1)), "PNG"),
        "progressive jpeg": encode(base, "JPEG", progressive=True),
    }


HOSTILE: dict[str, Callable[[], bytes]] = {
    "zero bytes": lambda: b"",
    "one byte": lambda: b"\xff",
    "plain text": lambda: b"this is not an image, it is a sentence\n" * 20,
    "html": lambda: b"<html><body><img src=x onerror=alert(1)></body></html>",
    "json": lambda: b'{"image": "cat.jpg"}',
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "pdf header": lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    "zip": lambda: b"PK\x03\x04" + b"\x00" * 100,
    "elf binary": lambda: b"\x7fELF\x02\x01\x01" + b"\x00" * 200,
    "random bytes": lambda: np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "truncated jpeg": lambda: jpeg(400, 300)[:1500],
    "jpeg header only": lambda: jpeg()[:20],
    "jpeg with garbage body": lambda: jpeg()[:200] + b"\x00" * 2000,
    "truncated png": lambda: encode(gradient(200, 200), "PNG")[:300],
    "png bad crc": lambda: (
        encode(gradient(), "PNG")[:30] + b"\x00\x00\x00\x00" + encode(gradient(), "PNG")[34:]
    ),
    "png header claims 30000x30000": lambda: png_header_only(30_000, 30_000),
    "png header claims 0x0": lambda: png_header_only(0, 0),
    "png 12000x12000 bomb": png_bomb,
    "progressive jpeg of 1,010 scans": progressive_jpeg_scan_bomb,
    "jpeg with 100,000 empty APP segments": lambda: jpeg_with_header_flood(b"\xff\xe5\x00\x02"),
    "jpeg with 100,000 comments": lambda: jpeg_with_header_flood(b"\xff\xfe\x00\x02"),
    "jpeg with 100,000 fill bytes": lambda: jpeg_with_header_flood(b"\xff"),
    "png with 100,000 chunks before its image data": lambda: png_with_chunks(
        png_chunk(b"abCd", b""), before_image_data=True
    ),
    "png with 100,000 chunks after its image data": lambda: png_with_chunks(png_chunk(b"tEXt", b"k\x00v")),
    "png with 100,000 empty IDAT chunks": lambda: png_with_chunks(png_chunk(b"IDAT", b"")),
    "tiff with 200,000 strips": lambda: tiff_with_strips(200_000),
    "rle bmp of 2 MB of empty deltas": lambda: rle_bmp(
        b"\x00\x02\x00\x00" * 500_000 + (b"\x40\x80" + b"\x00\x00") * 64 + b"\x00\x01"
    ),
    "gif with 100,000 comments": lambda: gif_with_blocks_before_image(b"\x21\xfe\x01x\x00" * 100_000),
    "gif comment of 100,000 sub-blocks": lambda: gif_with_blocks_before_image(
        b"\x21\xfe" + b"\x01x" * 100_000 + b"\x00"
    ),
    "gif header only": lambda: b"GIF89a\x10\x00\x10\x00",
    "truncated webp": lambda: encode(gradient(), "WEBP")[:40],
    "bmp header only": lambda: encode(gradient(), "BMP")[:30],
    "truncated tiff": lambda: encode(gradient(200, 200), "TIFF")[:200],
    "psd (not allowed)": lambda: b"8BPS\x00\x01" + b"\x00" * 200,
    "ico (not allowed)": lambda: encode(Image.new("RGB", (16, 16)), "ICO"),
    "eps (not allowed)": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    "pcx (not allowed)": lambda: encode(gradient(), "PCX"),
    "tga (not allowed)": lambda: encode(gradient(), "TGA"),
    "float tiff": lambda: encode(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"),
    "nul bytes": lambda: b"\x00" * 10_000,
    "png signature only": lambda: b"\x89PNG\r\n\x1a\n",
}


def malformed_exif_jpegs() -> dict[str, bytes]:
    """JPEGs whose EXIF block makes Pillow's exif_transpose raise something other than OSError or
    ValueError (found by mutating one byte of the block; offsets are from the "Exif" marker)."""
    from PIL.TiffImagePlugin import IFDRational

    image = gradient(96, 64)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate, so exif_transpose rewrites the EXIF block
    exif[0x010F] = "Camera"
    exif[0x011A] = IFDRational(72, 1)
    exif[0x0131] = "soft"
    base = encode(image, "JPEG", exif=exif.tobytes())
    start = base.index(b"Exif")

    def mutate(offset: int, value: int) -> bytes:
        data = bytearray(base)
        data[start + offset] = value
        return bytes(data)

    return {"struct.error": mutate(17, 0), "TypeError": mutate(17, 26), "AttributeError": mutate(41, 13)}
