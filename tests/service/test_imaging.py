"""The safe input contract at the decoding level: every mode handled, every hostile input refused."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from bench.hostile_images import jpeg_segments
from service.errors import ImageTooLarge, InvalidImage
from service.imaging import DecodeLimits, decode, decode_cost_bytes, preprocess
from tests.service import images

SIZE = (32, 32)


@pytest.mark.parametrize("name", sorted(images.valid_corpus()))
def test_every_accepted_format_and_mode_becomes_rgb_uint8(name: str) -> None:
    array = preprocess(images.valid_corpus()[name], SIZE)
    assert array.shape == (32, 32, 3)
    assert array.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(images.HOSTILE))
def test_hostile_input_is_refused_with_a_client_error(name: str) -> None:
    with pytest.raises((InvalidImage, ImageTooLarge)):
        preprocess(images.HOSTILE[name](), SIZE)


def test_exif_orientation_is_applied() -> None:
    upright = decode(images.exif_rotated_jpeg(orientation=1), (96, 64))
    rotated = decode(images.exif_rotated_jpeg(orientation=6), (96, 64))
    assert upright.size == (96, 64)
    assert rotated.size == (64, 96)  # orientation 6: stored landscape, shown portrait


def test_sixteen_bit_is_scaled_not_clamped() -> None:
    gray = np.asarray(decode(images.sixteen_bit_png(), (64, 64)))[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    # Clamping would saturate everything above 255/65535 of full scale: nearly all pixels.
    assert (gray == 255).mean() < 0.01
    assert 100 < gray.mean() < 155


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgb = np.asarray(decode(images.encode(transparent, "PNG"), (8, 8)))
    assert (rgb == 255).all()


def test_animated_gif_uses_the_first_frame() -> None:
    rgb = np.asarray(decode(images.animated_gif(), (40, 40)))
    assert tuple(rgb[20, 20]) == (255, 0, 0)


def test_cmyk_is_converted() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    rgb = np.asarray(decode(images.encode(cmyk, "JPEG", quality=100), (8, 8)))
    assert rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60


def test_pixel_cap_is_a_size_error_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="too many pixels"):
        decode(images.png_header_only(30_000, 30_000), SIZE)
    with pytest.raises(ImageTooLarge):
        decode(images.jpeg(200, 200), SIZE, DecodeLimits(max_pixels=100 * 100))


def test_large_jpeg_is_drafted_but_still_covers_the_target() -> None:
    big = images.jpeg(4000, 3000)
    image = decode(big, (299, 299))
    assert image.size[0] >= 299 and image.size[1] >= 299
    assert image.size[0] < 4000  # decoded at a reduced DCT scale


@pytest.mark.parametrize("name", sorted(images.malformed_exif_jpegs()))
def test_malformed_exif_is_a_client_error(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt block first
        with pytest.raises(InvalidImage, match="EXIF"):
            decode(images.malformed_exif_jpegs()[name], SIZE)


def test_thirty_two_bit_values_are_scaled_not_wrapped() -> None:
    ramp = np.linspace(0, 2**31 - 1, 64 * 64).reshape(64, 64).astype(np.int32)
    gray = np.asarray(decode(images.encode(Image.fromarray(ramp, mode="I"), "TIFF"), (64, 64)))[..., 0]
    # Wrapping modulo 256 would make the ramp saw-toothed; scaling keeps it monotonic 0..255.
    assert gray.min() == 0 and gray.max() == 255
    assert (np.diff(gray.ravel().astype(int)) >= 0).all()


def test_multi_picture_jpeg_is_drafted_too() -> None:
    first, second = images.gradient(4000, 3000), images.gradient(400, 300)
    mpo = images.encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    image = decode(mpo, (299, 299))
    assert 299 <= image.size[0] < 4000  # decoded at a reduced DCT scale, like a plain JPEG


def test_decode_cost_in_bytes_is_refused_from_the_header() -> None:
    # 16-bit grey: 2 bytes a pixel in Pillow plus the integer scaling's copies, 6 in all.
    blob = images.sixteen_bit_png()  # 64x64
    assert decode_cost_bytes("I;16", (64, 64)) == 64 * 64 * 6
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode(blob, SIZE, DecodeLimits(max_bytes=64 * 64 * 6 - 1))
    assert decode(blob, SIZE, DecodeLimits(max_bytes=64 * 64 * 6)).mode == "RGB"
    assert decode_cost_bytes("RGB", (10, 10), "WEBP") == 1600  # libwebp's own buffer


def test_a_large_jpeg_is_costed_at_its_draft_scale() -> None:
    big = images.jpeg(4000, 3000)  # 48 MB as full-size RGB, a sixteenth of that drafted to 1/4
    assert decode(big, (299, 299), DecodeLimits(max_bytes=4000 * 3000 * 4 // 8)).size[0] >= 299


def test_large_images_are_shrunk_before_full_size_conversions() -> None:
    rgba = Image.new("RGBA", (1000, 800), (10, 200, 30, 255))
    image = decode(images.encode(rgba, "PNG"), (100, 100))
    assert image.size == (125, 100)  # reduced by 8, still covering the target
    assert image.getpixel((50, 50)) == (10, 200, 30)


def test_a_jpeg_with_more_scans_than_the_limit_is_refused_before_decoding() -> None:
    bomb = images.progressive_jpeg_scan_bomb(side=2000, repeats=1000)
    with pytest.raises(ImageTooLarge, match="1010 scans"):
        decode(bomb, SIZE)
    # The limit is a setting: the same file decodes when the operator allows its scans.
    assert decode(bomb, SIZE, DecodeLimits(max_jpeg_scans=2000)).size >= SIZE


def test_progressive_jpegs_of_common_encoders_are_accepted() -> None:
    progressive = images.encode(images.gradient(400, 300), "JPEG", progressive=True, quality=90)
    scans = sum(segment[1] == 0xDA for segment in jpeg_segments(progressive))
    assert scans == 10  # libjpeg's default progression for colour photos
    assert decode(progressive, SIZE).size >= SIZE


def test_a_png_written_in_small_chunks_is_not_taken_for_a_flood() -> None:
    small_chunks = images.png_in_small_chunks(1024)
    assert small_chunks.count(b"IDAT") > 600
    assert decode(small_chunks, SIZE).size >= SIZE


def test_floods_are_refused_with_what_was_counted() -> None:
    with pytest.raises(InvalidImage, match="before its first scan"):
        decode(images.jpeg_with_header_flood(b"\xff\xe5\x00\x02"), SIZE)
    with pytest.raises(InvalidImage, match="chunks"):
        decode(images.png_with_chunks(images.png_chunk(b"abCd", b"")), SIZE)


def test_a_gif_with_a_long_comment_in_full_sub_blocks_is_accepted() -> None:
    comment = b"\x21\xfe" + (b"\xff" + b"c" * 255) * 4_000 + b"\x00"  # a 1 MB comment, 4,000 sub-blocks
    assert decode(images.gif_with_blocks_before_image(comment), SIZE).size >= SIZE


def test_a_tiff_with_as_many_strips_as_rows_is_accepted() -> None:
    assert decode(images.tiff_with_strips(64, side=64), SIZE).size >= SIZE


def test_a_small_rle_bmp_is_accepted() -> None:
    row = b"\x40\x80" + b"\x00\x00"  # 64 pixels of grey 128, end of line
    assert decode(images.rle_bmp(row * 64 + b"\x00\x01"), SIZE).size >= SIZE
