"""What an upload's container costs to parse, bounded before Pillow or libjpeg parse it.

The pixel cap and the decode-bytes cap (service/imaging.py) bound what the pixels cost. The
container around them can cost more than its bytes suggest, in time and in memory:
- Pillow walks a JPEG's segments before the first scan in Python, a step per segment or fill
  byte, and keeps every APP segment: 20 MB of empty APP segments took 8.2 s and 700 MiB.
- Pillow reads a PNG's chunks one by one in Python, before, between and after the image data:
  12 MB of empty chunks took 3 s.
- Pillow reads a GIF's extension blocks before the first image in Python and keeps a comment's
  sub-blocks: 20 MB of 1-byte sub-blocks took 2.7 s and 900 MiB (4 million comments: 3 s, 750).
- libjpeg decodes every scan of a progressive JPEG with a pass over every block of the image,
  and a scan of a flat area codes all of them in a dozen bytes: a 497 kB file of 8,010 scans at
  7000x7000 took 13.6 s (0.19 s without the repeated scans), so a 20 MB one would take about 50
  minutes (libjpeg-turbo calls this LJT-01-003 and leaves the limit to applications).
- Pillow makes a tile of every entry of a TIFF's strip or tile tables, in Python: 2.4 million
  strips in 19 MB took 12.4 s and 750 MiB.
- Pillow decodes RLE-compressed BMPs in Python, a step per command, and a delta of (0, 0) moves
  nothing: 4 MB of them took 1.1 s.
Each check here is a bounded count over the bytes, done before any parser sees them.
"""

from __future__ import annotations

from typing import Literal

from service.errors import ImageTooLarge, InvalidImage

_ENDIAN: dict[str, Literal["little", "big"]] = {"<": "little", ">": "big"}

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_START_OF_SCAN = b"\xff\xda"
_STANDALONE_JPEG_MARKERS = {0x01, *range(0xD0, 0xDA)}  # TEM, RSTn, SOI, EOI: no length field
# libjpeg's default progression writes 10 scans. libtiff stops a JPEG-compressed TIFF strip at 100 scans by
# itself (LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER; a strip of 1,010 was refused in 0.07 s), so JPEG
# files are the ones to count here.
DEFAULT_MAX_JPEG_SCANS = 100
# Segments before the first scan: APP0/APP1 EXIF/APP2 ICC, tables, SOF (at most 10 in the 8,419
# photos of the data folders); an ICC profile or XMP packet split into 64 KB segments adds more.
MAX_JPEG_STEPS_BEFORE_SCAN = 1_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks a PNG may have: a thousand, and one per KiB of file beyond that, so that image data
# written in small IDAT chunks (libpng's default is 8 KiB; the tests pass a file of 1 KiB chunks)
# is never taken for a flood.
MAX_PNG_CHUNKS_BASE = 1_000
PNG_BYTES_PER_EXTRA_CHUNK = 1_024

_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_GIF_EXTENSION = 0x21
# Extension blocks and their sub-blocks before a GIF's first image: a thousand, and one per 256
# bytes of file (a full sub-block's size), so a long comment or XMP packet is never a flood.
MAX_GIF_STEPS_BASE = 1_000
GIF_BYTES_PER_EXTRA_STEP = 256

# byte order, size of the directory's entry count, size of an entry, size of an entry's value count
_TIFF_LAYOUTS = {
    b"II*\x00": ("<", 2, 12, 4),
    b"MM\x00*": (">", 2, 12, 4),
    b"II+\x00": ("<", 8, 20, 8),  # BigTIFF
    b"MM\x00+": (">", 8, 20, 8),
}
_TIFF_STRIP_TAGS = {273, 279, 324, 325}  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
# Strips or tiles in a TIFF's first image: one strip per row of a 33,000-row image with three
# colour planes, or 256x256 tiles of several gigapixels, fit.
MAX_TIFF_STRIPS = 100_000
MAX_TIFF_TAGS = 10_000  # encoders write a few dozen; a BigTIFF's count is not capped by its format

_BMP_SIGNATURE = b"BM"
_BMP_RLE_COMPRESSIONS = {1, 2}  # BI_RLE8, BI_RLE4
# RLE compresses flat graphics, not photos; past this size its Python decoding costs seconds.
MAX_RLE_BMP_BYTES = 1024 * 1024


def refuse_costly_structure(data: bytes, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> None:
    """Raise InvalidImage (a structure no encoder writes) or ImageTooLarge (more scans than
    allowed) when parsing `data` would cost far more than its size suggests."""
    if data.startswith(_JPEG_SIGNATURE):
        limit = MAX_JPEG_STEPS_BEFORE_SCAN
        _refuse_flood(
            jpeg_steps_before_first_scan(data, limit),
            limit,
            f"JPEG has more than {limit} segments or fill bytes before its first scan",
        )
        _refuse_costly_scans(data, max_jpeg_scans)
    elif data.startswith(_PNG_SIGNATURE):
        limit = MAX_PNG_CHUNKS_BASE + len(data) // PNG_BYTES_PER_EXTRA_CHUNK
        _refuse_flood(
            png_chunk_count(data, limit),
            limit,
            f"PNG has more than {limit} chunks ({MAX_PNG_CHUNKS_BASE} and one per KiB of file are allowed)",
        )
    elif data.startswith(_GIF_SIGNATURES):
        limit = MAX_GIF_STEPS_BASE + len(data) // GIF_BYTES_PER_EXTRA_STEP
        _refuse_flood(
            gif_steps_before_first_image(data, limit),
            limit,
            f"GIF has more than {limit} extension blocks and sub-blocks before its first image "
            f"({MAX_GIF_STEPS_BASE} and one per {GIF_BYTES_PER_EXTRA_STEP} bytes of file are allowed)",
        )
    elif data[:4] in _TIFF_LAYOUTS:
        _refuse_tiff_table_flood(data)
    elif data.startswith(_BMP_SIGNATURE):
        _refuse_large_rle_bmp(data)


def jpeg_steps_before_first_scan(data: bytes, limit: int) -> int:
    """The steps Pillow's JPEG header parser takes before the first scan (a segment, a standalone
    marker or a fill byte each), counted up to limit + 1."""
    at, steps = 2, 0
    while at + 1 < len(data) and steps <= limit:
        steps += 1
        marker = data[at + 1]
        if data[at] != 0xFF or marker == _START_OF_SCAN[1]:
            break  # not a marker (Pillow refuses it) or the first scan: the header ends here
        if marker in (0xFF, 0x00):
            at += 1  # a fill byte
        elif marker in _STANDALONE_JPEG_MARKERS:
            at += 2
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return steps


def png_chunk_count(data: bytes, limit: int) -> int:
    """The chunks of a PNG, counted up to limit + 1 (a truncated last chunk counts)."""
    at, chunks = len(_PNG_SIGNATURE), 0
    while at < len(data) and chunks <= limit:
        chunks += 1
        at += 12 + int.from_bytes(data[at : at + 4], "big")  # length, type, data, CRC
    return chunks


def gif_steps_before_first_image(data: bytes, limit: int) -> int:
    """The extension blocks and sub-blocks before a GIF's first image, counted up to limit + 1.
    (Frames after the first are not read: only the first is classified.)"""
    if len(data) < 13:
        return 0
    flags = data[10]  # of the logical screen descriptor: is there a global colour table, how big
    at = 13 + (3 << ((flags & 0x07) + 1) if flags & 0x80 else 0)
    steps = 0
    while at < len(data) and data[at] == _GIF_EXTENSION and steps <= limit:
        steps += 1
        at += 2  # introducer and label
        while at < len(data) and steps <= limit:
            size = data[at]
            at += 1 + size
            steps += 1
            if size == 0:
                break
    return steps


def tiff_first_directory(data: bytes) -> tuple[int, int]:
    """The number of tags in a TIFF's first image directory, and the most entries any of its
    strip or tile tables declares; (0, 0) where the header is too short to say (Pillow refuses it)."""
    order, count_size, entry_size, value_count_size = _TIFF_LAYOUTS[data[:4]]
    offset_at, offset_size = (4, 4) if count_size == 2 else (8, 8)
    directory = int.from_bytes(data[offset_at : offset_at + offset_size], _ENDIAN[order])
    tags = int.from_bytes(data[directory : directory + count_size], _ENDIAN[order])
    most_strips = 0
    for entry in range(min(tags, MAX_TIFF_TAGS + 1)):
        at = directory + count_size + entry * entry_size
        if at + 4 + value_count_size > len(data):
            break
        if int.from_bytes(data[at : at + 2], _ENDIAN[order]) in _TIFF_STRIP_TAGS:
            values = int.from_bytes(data[at + 4 : at + 4 + value_count_size], _ENDIAN[order])
            most_strips = max(most_strips, values)
    return tags, most_strips


def _refuse_flood(counted: int, limit: int, what: str) -> None:
    """A structure no encoder writes: `counted` went past `limit` (the count stops just past it)."""
    if counted > limit:
        raise InvalidImage(f"this {what}: refused before parsing")


def _refuse_costly_scans(data: bytes, max_scans: int) -> None:
    """Every scan starts with the bytes FF DA and entropy-coded data cannot hold them (an FF there
    is followed by 00 or a restart marker), so counting them never misses one; it may count a
    thumbnail's or an MPO's second picture's scans too, which the limit leaves room for."""
    scans = data.count(_START_OF_SCAN)
    if scans > max_scans:
        raise ImageTooLarge(
            f"this JPEG has {scans} scans; the limit is {max_scans} (libjpeg's default progression "
            "writes 10, and each scan costs a pass over the whole image): re-encode it as a baseline JPEG"
        )


def _refuse_tiff_table_flood(data: bytes) -> None:
    tags, strips = tiff_first_directory(data)
    if tags > MAX_TIFF_TAGS or strips > MAX_TIFF_STRIPS:
        raise InvalidImage(
            f"this TIFF's first image has {tags} tags and strip or tile tables of up to {strips} "
            f"entries; at most {MAX_TIFF_TAGS} tags and {MAX_TIFF_STRIPS} strips or tiles are "
            "allowed: refused before parsing"
        )


def _refuse_large_rle_bmp(data: bytes) -> None:
    header_size = int.from_bytes(data[14:18], "little")
    compression = int.from_bytes(data[30:34], "little") if header_size >= 40 else 0  # not in OS/2's 12
    if compression in _BMP_RLE_COMPRESSIONS and len(data) > MAX_RLE_BMP_BYTES:
        raise InvalidImage(
            f"an RLE-compressed BMP of {len(data)} bytes; at most {MAX_RLE_BMP_BYTES} are accepted "
            "(its decoding runs a step per command): re-save it as PNG or as an uncompressed BMP"
        )
