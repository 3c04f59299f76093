"""Uploads built to cost far more to parse than their size suggests (service/image_structure.py
refuses each before a parser sees it): the tests send small ones, `make hostile-memory` and the
pod smoke test ones that fill the body cap."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG's marker segments in order, each scan (SOS) with its entropy-coded data."""
    segments, at = [], 2
    while at < len(data):
        marker = data[at + 1]
        if marker == 0xD9:  # EOI
            segments.append(data[at : at + 2])
            break
        end = at + 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
        if marker == 0xDA:  # the scan's data runs to the next marker that is not a stuffed 0xFF or RSTn
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append(data[at:end])
        at = end
    return segments


def progressive_jpeg_scan_bomb(side: int = 2000, repeats: int = 1000) -> bytes:
    """A progressive JPEG whose smallest scan is repeated: libjpeg decodes every scan with a pass
    over every block of the image, and a flat image's scan codes them all in about a dozen bytes
    (EOB runs), so decoding time grows with scans x pixels from a small file (libjpeg-turbo's
    LJT-01-003). Decodable: libjpeg only warns about the repeated progression."""
    data = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", progressive=True, quality=90)
    segments = jpeg_segments(data)
    smallest_scan = min((s for s in segments if s[1] == 0xDA), key=len)
    return data[:2] + b"".join(segments[:-1]) + smallest_scan * repeats + segments[-1]


def jpeg_with_header_flood(filler: bytes, count: int = 100_000) -> bytes:
    """A small JPEG with `count` copies of `filler` (an empty APP segment, a fill byte) between SOI
    and its first real segment: Pillow walks everything before the first scan in Python, a step
    per segment or fill byte, keeping every APP segment (20 MB of them took 8 s and 700 MiB)."""
    data = encode(Image.new("RGB", (96, 64), (120, 130, 140)), "JPEG")
    return data[:2] + filler * count + data[2:]


def gif_with_blocks_before_image(blocks: bytes) -> bytes:
    """A small GIF with `blocks` (extensions) before its first image: Pillow reads them in Python
    and keeps the sub-blocks of a comment (20 MB of 1-byte sub-blocks took 2.7 s and 900 MiB)."""
    data = encode(Image.new("P", (64, 64)), "GIF")
    first_image = data.index(b"\x2c")  # the image descriptor of this small file
    return data[:first_image] + blocks + data[first_image:]


def tiff_with_strips(strips: int, side: int = 64) -> bytes:
    """A small grey TIFF whose strip tables list `strips` strips, all pointing at its pixels:
    Pillow makes a tile of each, in Python (2.4 million strips in 19 MB took 12 s and 750 MiB)."""
    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    tags += [(277, 3, 1, 1), (278, 4, 1, 1)]
    ifd_bytes = 2 + 12 * (len(tags) + 2) + 4
    offsets_at = 8 + ifd_bytes
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    tags += [(273, 4, strips, offsets_at), (279, 4, strips, counts_at)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + b"\0" * 4
    tables = struct.pack(f"<{strips}I", *[pixels_at] * strips) + struct.pack(f"<{strips}I", *[side] * strips)
    return b"II*\0" + struct.pack("<I", 8) + ifd + tables + b"\x80" * side * side


def rle_bmp(commands: bytes, side: int = 64) -> bytes:
    """An 8-bit RLE-compressed BMP whose pixel data is `commands`: Pillow decodes RLE in Python, a
    step per command, and a delta of (0, 0) moves nothing (4 MB of them took 1.1 s)."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(commands), 2835, 2835, 256, 0)
    start = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", start + len(commands), 0, 0, start) + info + palette + commands


def container_floods(body_bytes: int) -> dict[str, bytes]:
    """One upload of each kind, as large as a body of `body_bytes` allows (with room for a tail)."""
    room = body_bytes - 64 * 1024
    one_scan, two_scans = (len(progressive_jpeg_scan_bomb(7000, n)) for n in (1, 2))
    return {
        "JPEG of empty APP segments": jpeg_with_header_flood(b"\xff\xe5\x00\x02", room // 4),
        "GIF comment of 1-byte sub-blocks": gif_with_blocks_before_image(
            b"\x21\xfe" + b"\x01x" * (room // 2) + b"\x00"
        ),
        "TIFF of strips": tiff_with_strips(room // 8),
        "progressive JPEG of repeated scans": progressive_jpeg_scan_bomb(
            7000, (room - one_scan) // (two_scans - one_scan) + 1
        ),
        "RLE BMP of empty deltas": rle_bmp(b"\x00\x02\x00\x00" * (room // 4) + b"\x00\x01"),
    }
