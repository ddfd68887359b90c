"""Tests for blip2_search.images: formats, colour modes, orientation, errors, EXIF, fast path.

Every file is made here in tmp_path; expectations are computed independently (numpy geometry,
direct PIL calls, hand-written PNG chunks), not by calling the code under test.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import warnings
import zlib
from datetime import datetime

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from blip2_search.errors import ImageDecodeError, InvalidInputError
from blip2_search.images import DecodedImage, ImageInfo, decode_for_model, decoded_pixels, open_image, read_info
from blip2_search.imaging import sources

RNG_SEED = 1234


# ---------------------------------------------------------------------------------------------
# helpers


def blocks(width: int = 96, height: int = 64) -> np.ndarray:
    """An asymmetric upright test picture [height, width, 3] uint8: a 3x2 grid of distinct colours."""
    colours = [(230, 30, 30), (30, 200, 40), (40, 40, 220), (240, 220, 30), (200, 40, 200), (20, 20, 20)]
    out = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(colours):
        r, c = divmod(k, 3)
        out[r * height // 2 : (r + 1) * height // 2, c * width // 3 : (c + 1) * width // 3] = colour
    return out


def photo(width: int, height: int, seed: int = RNG_SEED) -> np.ndarray:
    """A photo-like [height, width, 3] uint8 array: smooth colour field, shapes, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(-1, 1, 3)
        out[..., c] = 128 + 70 * np.sin(5 * (fx * xx / width + fy * yy / height) + 3 * ph)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = rng.integers(width // 30, width // 6)
        out[(xx - x0) ** 2 + (yy - y0) ** 2 < r * r] = rng.uniform(0, 255, 3)
    out += rng.normal(0, 6, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def save(arr_or_img, path, fmt: str | None = None, **kw):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, fmt, **kw)
    return path


def mae(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG file built from its chunks (filter byte 0 must already start every row of raw_rows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw_rows))
        + png_chunk(b"IEND", b"")
    )


def decode_error(source, **kw) -> str:
    """Decode `source`, expecting ImageDecodeError; check the message is one line and names a fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError) as info:
            open_image(source, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert "; " in message, f"no fix named in: {message}"
    return message


# ---------------------------------------------------------------------------------------------
# formats

LOSSLESS = [("png", "PNG", {}), ("gif", "GIF", {}), ("tif", "TIFF", {}), ("bmp", "BMP", {}), ("webp", "WEBP", {"lossless": True})]
LOSSY = [("jpg", "JPEG", {"quality": 95}), ("webp", "WEBP", {"quality": 95})]


@pytest.mark.parametrize("ext,fmt,kw", LOSSLESS)
def test_lossless_formats_round_trip_exactly(tmp_path, ext, fmt, kw):
    upright = blocks()
    path = save(upright, tmp_path / f"a.{ext}", fmt, **kw)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (96, 64)
    np.testing.assert_array_equal(np.asarray(img), upright)
    assert decode_for_model(path, 32).info.format == fmt


@pytest.mark.parametrize("ext,fmt,kw", LOSSY)
def test_lossy_formats_decode_close(tmp_path, ext, fmt, kw):
    upright = blocks()
    path = save(upright, tmp_path / f"a.{ext}", fmt, **kw)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (96, 64)
    assert mae(img, upright) < 4


def test_avif_decodes_natively(tmp_path):
    upright = blocks(128, 96)
    path = save(upright, tmp_path / "a.avif", "AVIF", quality=90)
    img = open_image(path)
    assert img.size == (128, 96) and mae(img, upright) < 6
    assert read_info(path).format == "AVIF"


def test_heic_decodes_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif not installed (pip install pillow-heif)")
    upright = blocks(128, 96)
    path = tmp_path / "a.heic"
    pillow_heif.from_pillow(Image.fromarray(upright)).save(path, quality=90)
    img = open_image(path)
    assert img.size == (128, 96) and mae(img, upright) < 6
    assert decode_for_model(path, 32).info.format == "HEIF"


def test_heic_orientation_is_applied_once(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif not installed (pip install pillow-heif)")
    pillow_heif.register_heif_opener()  # for Image.save(..., "HEIF") below
    upright = blocks(128, 96)
    stored = np.rot90(upright, 1)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored, tmp_path / "rot.heic", "HEIF", exif=exif.tobytes(), quality=90)
    img = open_image(path)
    assert img.size == (128, 96) and mae(img, upright) < 6


def test_generic_mif1_brand_reaches_the_right_decoder(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif not installed (pip install pillow-heif)")
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    avif, heic = io.BytesIO(), io.BytesIO()
    img.save(avif, "AVIF", quality=90)
    pillow_heif.from_pillow(img).save(heic, format="HEIF", quality=90)
    for data, fmt in ((avif.getvalue(), "AVIF"), (heic.getvalue(), "HEIF")):
        assert data[4:8] == b"ftyp"
        generic = data[:8] + b"mif1" + data[12:]  # major brand "mif1": HEIC or AVIF, decided by the rest
        assert read_info(generic).format == fmt
        assert mae(open_image(generic), np.full((48, 64, 3), (200, 30, 30))) < 4


def test_pillow_heif_is_needed_only_for_heic(tmp_path, monkeypatch):
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif not installed (pip install pillow-heif)")
    path = tmp_path / "a.heic"
    pillow_heif.from_pillow(Image.new("RGB", (16, 16))).save(path)
    png = save(blocks(), tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # "import pillow_heif" now raises ImportError
    monkeypatch.setattr(sources, "_heif_registered", False)
    np.testing.assert_array_equal(np.asarray(open_image(png)), blocks())
    message = decode_error(path)
    assert "pip install pillow-heif" in message and "a.heic" in message


def test_mpo_multi_picture_jpeg_reads_as_jpeg(tmp_path):
    first, second = Image.fromarray(blocks(480, 320)), Image.new("RGB", (480, 320), (0, 0, 255))
    path = tmp_path / "phone.jpg"
    first.save(path, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(path).format == "MPO"
    decoded = decode_for_model(path, 40, fast=True)
    assert decoded.info.format == "JPEG" and (decoded.info.width, decoded.info.height) == (480, 320)
    expected = np.asarray(first.resize((40, 40), Image.Resampling.BICUBIC))
    assert mae(decoded.pixels, expected) < 3


def test_gif_uses_first_frame(tmp_path):
    first, second = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert open_image(path).getpixel((5, 5)) == (255, 0, 0)


def test_sources_path_str_bytes_fileobj_and_stream(tmp_path):
    upright = blocks()
    path = save(upright, tmp_path / "a.png")
    data = path.read_bytes()

    class Stream(io.RawIOBase):
        def __init__(self, payload):
            self._buf = io.BytesIO(payload)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self._buf.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    for source in (path, str(path), data, bytearray(data), io.BytesIO(data), open(path, "rb"), Stream(data)):
        np.testing.assert_array_equal(np.asarray(open_image(source)), upright)


def test_a_file_opened_in_text_mode_is_refused_with_the_fix(tmp_path):
    path = save(blocks(), tmp_path / "a.png")
    text = tmp_path / "a.ppm"
    text.write_text("P3\n1 1\n255\n255 0 0\n")  # an image whose bytes decode as text too
    for source in (path, text):
        with open(source) as opened, pytest.raises(InvalidInputError, match=r"opened in text mode; open it with open\(path, 'rb'\)"):
            open_image(opened)


# ---------------------------------------------------------------------------------------------
# colour modes


def test_cmyk_jpeg_adobe_inverted_and_cmyk_tiff(tmp_path):
    cmyk = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    jpeg = save(cmyk, tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert b"Adobe" in jpeg.read_bytes()  # Pillow stores CMYK JPEGs inverted, Adobe style
    assert Image.open(jpeg).tile[0].args[0] == "CMYK;I"
    assert mae(open_image(jpeg), np.full((32, 32, 3), (0, 255, 255))) < 3
    tiff = save(Image.new("CMYK", (8, 8), (0, 0, 255, 0)), tmp_path / "cmyk.tif")
    assert open_image(tiff).getpixel((3, 3)) == (255, 255, 0)
    assert decode_for_model(jpeg, 16, fast=True).pixels.shape == (16, 16, 3)


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(64 * 8, dtype=np.uint32).reshape(8, 64) * 128).astype(np.uint16)
    expected = np.rint(values / 257.0).astype(np.uint8)
    for ext in ("png", "tif"):
        path = save(Image.fromarray(values), tmp_path / f"g16.{ext}")
        assert Image.open(path).mode.startswith("I;16")
        got = np.asarray(open_image(path))
        np.testing.assert_array_equal(got[..., 0], expected)
        np.testing.assert_array_equal(got[..., 0], got[..., 2])


def test_16bit_rgb_png_and_32bit_int_and_float_tiff(tmp_path):
    h, w = 4, 16
    rgb16 = (np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) * 1361 % 65536).astype(">u2")
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(h))
    path = tmp_path / "rgb16.png"
    path.write_bytes(handmade_png(w, h, 16, 2, rows))
    got = np.asarray(open_image(path)).astype(int)
    assert np.abs(got - rgb16.astype(np.float64) / 257.0).max() <= 1

    ints = (np.arange(64, dtype=np.int32).reshape(4, 16) * 1000).astype(np.int32)
    save(Image.fromarray(ints, "I"), tmp_path / "i32.tif")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "i32.tif"))[..., 1], np.rint(ints / 257.0).astype(np.uint8))

    floats = np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 16)
    save(Image.fromarray(floats, "F"), tmp_path / "f32.tif")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "f32.tif"))[..., 0], np.rint(floats * 255).astype(np.uint8))


def test_palette_with_transparency_goes_white(tmp_path):
    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([200, 10, 10, 0, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    for ext in ("png", "gif"):
        path = save(pal, tmp_path / f"p.{ext}", transparency=1)
        img = open_image(path)
        assert img.getpixel((1, 1)) == (255, 255, 255)
        assert img.getpixel((0, 0)) == (200, 10, 10)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = np.array([0, 64, 128, 255], np.uint8)[None, :]
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    got = np.asarray(open_image(path)).astype(np.float64)
    assert np.abs(got - expected).max() <= 1
    assert tuple(got[0, 0]) == (255, 255, 255)

    la = np.stack([np.full((4, 4), 50, np.uint8), rgba[..., 3]], -1)
    path = save(Image.fromarray(la, "LA"), tmp_path / "la.png")
    expected = 50 * alpha[..., 0] + 255 * (1 - alpha[..., 0])
    assert np.abs(np.asarray(open_image(path))[..., 0] - expected).max() <= 1


def test_grey_and_bilevel(tmp_path):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    path = save(Image.fromarray(grey, "L"), tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(open_image(path))[..., 2], grey)
    bits = Image.fromarray(grey > 100).convert("1")
    path = save(bits, tmp_path / "one.bmp")
    np.testing.assert_array_equal(np.asarray(open_image(path))[..., 0], np.where(grey > 100, 255, 0))


# ---------------------------------------------------------------------------------------------
# EXIF orientation

# How a camera stores an upright picture U for each EXIF orientation (EXIF 2.32, tag 0x0112):
# orientation 6 means "stored row 0 is the visual right-hand side, column 0 the visual top", etc.
STORED_FOR_ORIENTATION = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],
    3: lambda u: u[::-1, ::-1],
    4: lambda u: u[::-1, :],
    5: lambda u: u.transpose(1, 0, 2),
    6: lambda u: np.rot90(u, 1),
    7: lambda u: np.rot90(u, 1)[:, ::-1],
    8: lambda u: np.rot90(u, -1),
}


def oriented_jpeg(tmp_path, upright: np.ndarray, orientation: int, name: str = "o"):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    return save(stored, tmp_path / f"{name}{orientation}.jpg", "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_all_paths_upright(tmp_path, orientation):
    upright = blocks(480, 320)
    path = oriented_jpeg(tmp_path, upright, orientation)
    img = open_image(path)
    assert img.size == (480, 320)
    assert mae(img, upright) < 2
    assert mae(img, ImageOps.exif_transpose(Image.open(path)).convert("RGB")) < 0.01
    expected = np.asarray(Image.fromarray(upright).resize((40, 40), Image.Resampling.BICUBIC))
    for fast in (False, True):
        decoded = decode_for_model(path, 40, fast=fast)
        assert (decoded.info.width, decoded.info.height) == (480, 320)
        assert mae(decoded.pixels, expected) < 3, f"fast={fast}"
    assert open_image(path).getexif().get(0x0112, 1) == 1


def test_orientation_in_png_and_webp(tmp_path):
    upright = blocks()
    exif = Image.Exif()
    exif[0x0112] = 8
    for ext, kw in (("png", {}), ("webp", {"lossless": True})):
        path = save(np.ascontiguousarray(np.rot90(upright, -1)), tmp_path / f"o.{ext}", exif=exif.tobytes(), **kw)
        np.testing.assert_array_equal(np.asarray(open_image(path)), upright)


def test_invalid_orientation_value_is_ignored(tmp_path):
    upright = blocks()
    exif = Image.Exif()
    exif[0x0112] = 99
    path = save(upright, tmp_path / "bad.png", exif=exif.tobytes())
    np.testing.assert_array_equal(np.asarray(open_image(path)), upright)


# ---------------------------------------------------------------------------------------------
# metadata


def test_exif_date_make_model(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "Canon\x00"
    exif[0x0110] = "  EOS R5  "
    exif[0x0132] = "2020:01:01 00:00:00"
    exif.get_ifd(0x8769)[0x9003] = "2023:07:14 18:02:33"
    path = save(blocks(), tmp_path / "e.jpg", "JPEG", exif=exif.tobytes())
    info = decode_for_model(path, 16).info
    assert info == ImageInfo(96, 64, "JPEG", datetime(2023, 7, 14, 18, 2, 33), "Canon", "EOS R5")
    assert read_info(path) == info

    fallback = Image.Exif()
    fallback[0x0132] = "2019:02:03 04:05:06"
    fallback[0x0110] = ""
    path = save(blocks(), tmp_path / "f.jpg", "JPEG", exif=fallback.tobytes())
    info = read_info(path)
    assert info.taken_at == datetime(2019, 2, 3, 4, 5, 6) and info.taken_at.tzinfo is None
    assert info.camera_make is None and info.camera_model is None

    zero = Image.Exif()
    zero[0x0132] = "0000:00:00 00:00:00"
    assert read_info(save(blocks(), tmp_path / "z.jpg", "JPEG", exif=zero.tobytes())).taken_at is None


CORRUPT_EXIF = [
    b"Exif\x00\x00garbage-not-tiff",  # no TIFF header
    b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 20,  # IFD offset far past the end
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 30,  # 65535 entries claimed, 30 bytes present
]


@pytest.mark.parametrize("payload", CORRUPT_EXIF)
def test_corrupt_exif_never_fails_decode(tmp_path, payload):
    upright = blocks()
    path = save(upright, tmp_path / "c.jpg", "JPEG", quality=95, exif=payload)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_for_model(path, 24)
        img = open_image(path)
    assert decoded.info.taken_at is None and decoded.info.camera_make is None
    assert (decoded.info.width, decoded.info.height) == (96, 64)
    assert mae(img, upright) < 4


# ---------------------------------------------------------------------------------------------
# errors: each one ImageDecodeError, one line, file named, fix named


def test_zero_byte(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    message = decode_error(path)
    assert "empty" in message and repr(str(path)) in message
    assert "empty" in decode_error(b"")


@pytest.mark.parametrize("ext,fmt", [("jpg", "JPEG"), ("png", "PNG")])
def test_truncated_files(tmp_path, ext, fmt):
    full = save(photo(300, 200), tmp_path / f"full.{ext}", fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    message = decode_error(path)
    assert "truncated" in message and repr(str(path)) in message
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_for_model(path, 32, fast=True)


END_MARKER_CASES = {
    "baseline": ({}, "RGB"), "progressive": ({"progressive": True}, "RGB"), "restarts": ({"restart_marker_rows": 1}, "RGB"),
    "progressive-restarts": ({"progressive": True, "restart_marker_blocks": 3}, "RGB"),
    "4:4:4": ({"subsampling": 0}, "RGB"), "4:2:2-optimized": ({"subsampling": 1, "optimize": True}, "RGB"),
    "grey": ({}, "L"), "grey-restarts": ({"restart_marker_blocks": 5}, "L"),
    "uniform-grey": ({}, "flat"),  # its last blocks decode grey past the data too: the slow check decides
}


@pytest.mark.parametrize("case", END_MARKER_CASES)
def test_a_jpeg_missing_only_its_end_marker_is_decoded_whole(tmp_path, case):
    """Some cameras and transfer tools leave out the final EOI marker; viewers (and Pillow told to load truncated
    images) show the file whole, pixel for pixel, but it was refused as truncated. Both paths now decode it as
    the whole file; a file that lacks scan data is still refused by both, wherever it was cut."""
    kw, mode = END_MARKER_CASES[case]
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    picture = Image.new("RGB", (300, 200), (128, 128, 128)) if mode == "flat" else Image.fromarray(photo(300, 200)).convert(mode)
    whole = save(picture, tmp_path / "whole.jpg", "JPEG", quality=90, exif=exif.tobytes(), **kw)
    data = whole.read_bytes()
    assert data.endswith(b"\xff\xd9")
    no_eoi = tmp_path / "no eoi.jpg"
    for missing in (data[-2:], data[-1:]):  # the marker, or its last byte
        no_eoi.write_bytes(data[: -len(missing)])
        np.testing.assert_array_equal(np.asarray(open_image(no_eoi)), np.asarray(open_image(whole)))
        for fast in (True, False):
            got, want = decode_for_model(no_eoi, 64, fast=fast), decode_for_model(whole, 64, fast=fast)
            np.testing.assert_array_equal(got.pixels, want.pixels)
            assert got.info == want.info and got.info.camera_make == "Canon"
    markers = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]
    cuts = {"one data byte": len(data) - 3, "a third": len(data) // 3, "before the last marker": markers[-2],
            "inside the last marker": markers[-2] + 1}
    scans = [i for i in markers if data[i + 1] == 0xDA]
    if len(scans) > 1:  # progressive: right after the data of the last scan but one (the scans that follow are missing)
        cuts["between scans"] = next(i for i in markers if i > scans[-2] and data[i + 1] not in range(0xD0, 0xD8))
    cut = tmp_path / "cut.jpg"
    for where, end in cuts.items():
        cut.write_bytes(data[:end])
        for fast in (True, False):
            with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
                decode_for_model(cut, 64, fast=fast)
                pytest.fail(f"cut {where} ({len(data) - end} bytes short) was decoded, fast={fast}")


@pytest.mark.parametrize("width, mode", [(1, "L"), (4, "L"), (7, "L"), (4, "RGB"), (7, "RGB")])
def test_a_cut_jpeg_under_8_px_wide_is_still_refused(tmp_path, width, mode):
    """Pillow cannot decode a picture under 8 px wide at 1/8 scale (its draft keeps both sides >= 1 px per DCT
    scale step), yet the extra-row check looked for the declared extra row where 1/8 scale puts it: it found the
    picture's own rows there and took files cut up to hundreds of bytes short for ones missing only their end
    marker, decoding them with grey where the data was missing. (The full-size check alone matches more cuts by
    chance on such narrow files, where a 1 px wide 4:2:0 picture hides most of each MCU: those are not tested.)"""
    picture = Image.fromarray(np.random.default_rng(width).integers(0, 256, (200, width, 3), dtype=np.uint8)).convert(mode)
    data = save(picture, tmp_path / "narrow.jpg", "JPEG", quality=100).read_bytes()
    no_eoi, cut = tmp_path / "no eoi.jpg", tmp_path / "cut.jpg"
    no_eoi.write_bytes(data[:-2])
    np.testing.assert_array_equal(np.asarray(open_image(no_eoi)), np.asarray(open_image(data)))
    for short in (3, 40, len(data) // 3):
        cut.write_bytes(data[:-short])
        for fast in (True, False):
            with pytest.raises(ImageDecodeError, match="truncated"):
                decode_for_model(cut, 32, fast=fast)
                pytest.fail(f"a {width} px wide {mode} JPEG cut {short} bytes short was decoded, fast={fast}")


@pytest.mark.parametrize("kw", [{}, {"restart_marker_rows": 1}, {"subsampling": 0}], ids=["baseline", "restarts", "4:4:4"])
def test_a_jpeg_missing_only_its_end_marker_costs_no_full_size_decode(tmp_path, monkeypatch, kw):
    """Telling a file that lacks only its end marker from one cut short took two full-size decodes besides the
    decode itself (a 12 MP photo: ~300 ms on the fast path instead of ~35 ms); a sequential JPEG now needs none:
    the fast path decodes nothing at full size. (A file cut inside its last block still takes them: its cut
    shows only in coefficients that a 1/8-scale decode leaves out.)"""
    data = save(photo(1600, 1200), tmp_path / "whole.jpg", "JPEG", quality=90, **kw).read_bytes()
    loaded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    whole = decode_for_model(data, 224, fast=True).pixels
    np.testing.assert_array_equal(decode_for_model(data[:-2], 224, fast=True).pixels, whole)
    assert loaded and (1600, 1200) not in loaded, loaded
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_for_model(data[:-3], 224, fast=True)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: eggs, milk\n")
    message = decode_error(path)
    assert "not an image" in message and "'.jpg'" in message and repr(str(path)) in message


def test_a_text_file_named_jpg_read_as_a_file_object_says_so_too(tmp_path):
    """The indexer decodes a file's bytes from memory (it hashes them first): the stream's name gives the extension."""
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: eggs, milk\n")
    named = io.BytesIO(path.read_bytes())
    named.name = str(path)
    with open(path, "rb") as opened:
        for source in (opened, named):
            message = decode_error(source)
            assert "despite its '.jpg' extension" in message and repr(str(path)) in message, message
    assert "despite" not in decode_error(io.BytesIO(path.read_bytes()))  # no name, no extension to defy


def test_a_text_file_named_txt_is_not_said_to_defy_its_extension(tmp_path):
    """"despite its extension" only where the extension is one of an image we read (a .JPG too)."""
    for name, despite in (("notes.txt", False), ("README", False), ("photo.JPG", True)):
        (tmp_path / name).write_text("shopping list: eggs, milk\n")
        message = decode_error(tmp_path / name)
        assert "not an image file (content not recognised" in message and ("despite" in message) == despite, message


def test_unsupported_formats(tmp_path):
    pdf = save(Image.fromarray(blocks()), tmp_path / "doc.pdf", "PDF")
    assert "unsupported format (PDF)" in decode_error(pdf)
    ico = save(Image.fromarray(blocks(32, 32)), tmp_path / "fav.ico", "ICO")
    assert Image.open(ico).format == "ICO"  # Pillow could read it; we refuse the exotic parser
    assert "unsupported format (ICO)" in decode_error(ico)
    assert "JPEG XL" in decode_error(b"\xff\x0a" + b"\x00" * 40)


def test_bomb_header_refused_before_decoding(tmp_path):
    rows = b"\x00" * 8
    huge = tmp_path / "huge.png"
    huge.write_bytes(handmade_png(30_000, 20_000, 8, 2, rows))  # 600 MP declared, 1 KB on disk
    message = decode_error(huge)
    assert "600.0 MP" in message and "max_pixels" in message

    # Above Pillow's warning threshold (89 MP) but below its error: our cap refuses it, no warning leaks.
    mid = tmp_path / "mid.png"
    mid.write_bytes(handmade_png(10_000, 9_500, 8, 2, rows))
    message = decode_error(mid, max_pixels=50_000_000)
    assert "95.0 MP" in message and "50.0 MP limit" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError):
            decode_for_model(mid, 224)

    small = save(blocks(), tmp_path / "small.png")
    assert "max_pixels" in decode_error(small, max_pixels=1000)
    assert open_image(small, max_pixels=96 * 64).size == (96, 64)


@pytest.mark.parametrize("kw", [{"progressive": True}, {}], ids=["progressive", "baseline"])
def test_a_jpeg_without_end_marker_over_the_cap_is_refused_before_any_decode(tmp_path, monkeypatch, kw):
    """A JPEG lacking its end marker was checked by `jpeg_end` (a progressive one: two full-size decodes) before the
    bomb check read its header: a file over max_pixels (or between the 160 MP default and Pillow's 179 MP limit)
    was decoded in full, twice, only to be refused."""
    from blip2_search.imaging import jpeg_end

    decoded = []
    for name in ("_full_pixels", "_eighth_scale_pixels"):  # jpeg_end catches what they raise: record, don't raise
        monkeypatch.setattr(jpeg_end, name, lambda data, real=getattr(jpeg_end, name): decoded.append(name) or real(data))
    data = save(photo(400, 300), tmp_path / "whole.jpg", "JPEG", quality=90, **kw).read_bytes()[:-2]
    for call in (lambda: decode_for_model(data, 32, max_pixels=50_000), lambda: open_image(data, max_pixels=50_000)):
        with pytest.raises(ImageDecodeError, match="max_pixels"):
            call()
    assert decoded == []
    assert decode_for_model(data, 32).pixels.shape == (32, 32, 3)  # under the cap: still decoded whole


def test_unreadable_permissions_monkeypatched(tmp_path, monkeypatch):
    path = save(blocks(), tmp_path / "secret.png")
    real_open = os.open

    def deny(target, *args, **kwargs):
        if os.fspath(target) == str(path):
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    message = decode_error(path)
    assert "permission denied" in message and "chmod" in message


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root reads chmod-000 files; test_unreadable_permissions_monkeypatched covers this path",
)
def test_unreadable_permissions_real(tmp_path):
    path = save(blocks(), tmp_path / "secret.png")
    path.chmod(0)
    assert "permission denied" in decode_error(path)


def test_broken_symlink_loop_directory_missing_fifo(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.symlink_to(tmp_path / "gone.jpg")
    assert "broken symlink" in decode_error(broken)
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.symlink_to(b)
    b.symlink_to(a)
    assert "symlink loop" in decode_error(a)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert "directory" in decode_error(folder)
    assert "no such file" in decode_error(tmp_path / "missing.jpg")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.jpg"
        os.mkfifo(fifo)
        assert "not a regular file" in decode_error(fifo)


def test_odd_file_names(tmp_path):
    upright = blocks()
    for name in ("with space.png", "emoji \U0001F4F7.png", "new\nline.png", "ünïcödé.png"):
        path = save(upright, tmp_path / name)
        np.testing.assert_array_equal(np.asarray(open_image(path)), upright)
        assert decode_for_model(str(path), 16).pixels.shape == (16, 16, 3)
    bad = tmp_path / "new\nline.jpg"
    bad.write_text("not an image")
    message = decode_error(bad)
    assert "new\\nline.jpg" in message


def test_random_corruption_only_raises_image_decode_error(tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    sources = []
    for fmt, kw in (("JPEG", {"quality": 90}), ("PNG", {}), ("GIF", {}), ("TIFF", {}), ("WEBP", {}), ("BMP", {})):
        buf = io.BytesIO()
        Image.fromarray(photo(64, 48)).save(buf, fmt, **kw)
        sources.append(buf.getvalue())
    for data in sources:
        for _ in range(12):
            mutated = bytearray(data)
            if rng.random() < 0.5:
                mutated = mutated[: int(rng.integers(1, len(mutated)))]
            for _ in range(int(rng.integers(1, 8))):
                mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    decoded = decode_for_model(bytes(mutated), 16)
                except ImageDecodeError:
                    continue
            assert decoded.pixels.shape == (16, 16, 3)


def test_bad_arguments():
    with pytest.raises(InvalidInputError):
        decode_for_model(b"x", 0)
    with pytest.raises(InvalidInputError):
        open_image(b"x", max_pixels=0)
    with pytest.raises(InvalidInputError):
        open_image(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the model path


def test_reference_path_equals_plain_pil(tmp_path):
    path = save(photo(640, 480), tmp_path / "p.jpg", "JPEG", quality=90)
    expected = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
    decoded = decode_for_model(path, 224, fast=False)
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.shape == (224, 224, 3) and decoded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.info == ImageInfo(640, 480, "JPEG")


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.NEAREST, Image.Resampling.LANCZOS])
def test_both_paths_resize_with_the_filter_asked(tmp_path, resample):
    """The processor's `resample` (a fine-tuned checkpoint may say bilinear), not always bicubic."""
    path = save(photo(80, 60), tmp_path / "p.png")
    expected = np.asarray(Image.open(path).convert("RGB").resize((32, 32), resample))
    for fast in (False, True):  # 80 px: below the fast path's draft and pre-reduction, so the same pixels
        np.testing.assert_array_equal(decode_for_model(path, 32, resample, fast=fast).pixels, expected)
    with pytest.raises(InvalidInputError, match=r"resample 'bicubic' is not a PIL resampling filter; pass the processor's resample"):
        decode_for_model(path, 32, "bicubic")  # type: ignore[arg-type]


def test_fast_path_close_to_reference_on_large_jpeg(tmp_path, monkeypatch):
    path = save(photo(2400, 1800), tmp_path / "big.jpg", "JPEG", quality=90)
    reference = decode_for_model(path, 224, fast=False).pixels.astype(np.float64)
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    # 2x oversampling needs >= 448 px per axis: 1/4 scale (600x450); 1x needs >= 224: 1/8 (300x225).
    for oversample, decoded_size, bound in ((2.0, (600, 450), 0.4), (1.0, (300, 225), 0.9)):
        drafted.clear()
        fast = decode_for_model(path, 224, fast=True, oversample=oversample).pixels.astype(np.float64)
        assert drafted == [decoded_size]
        error = fast - reference
        psnr = 10 * np.log10(255.0**2 / np.mean(error**2))
        assert np.abs(error).mean() < bound and psnr > 40, (oversample, np.abs(error).mean(), psnr)


def test_fast_path_decodes_in_full_for_a_nearest_filter(tmp_path):
    """Nearest picks single pixels, which a DCT-scaled, pre-reduced JPEG does not hold: the fast path was 3.1 grey
    levels off the processor's resize on average and up to 127 (0.2-0.6 for the other filters). With nearest it now
    decodes in full, and `model_draft_side` tells a caller budgeting the decode."""
    path = save(photo(2400, 1800), tmp_path / "big.jpg", "JPEG", quality=90)
    nearest = int(Image.Resampling.NEAREST)
    reference = decode_for_model(path, 224, nearest, fast=False).pixels
    np.testing.assert_array_equal(decode_for_model(path, 224, nearest, fast=True).pixels, reference)
    from blip2_search.images import model_draft_side

    assert model_draft_side(224, nearest) is None and model_draft_side(224, int(Image.Resampling.BICUBIC)) == 448
    assert decoded_pixels(path, draft_side=model_draft_side(224, nearest)) == 2400 * 1800


@pytest.mark.parametrize("width,height,size", [(641, 479, 64), (1003, 757, 64), (2401, 1799, 224)])
def test_fast_path_close_to_reference_on_jpegs_of_odd_size(width, height, size):
    """A DCT-scaled decode rounds its size up (641 px at 1/2: 321), its last column holding half a pixel; resized
    as a whole pixel, the picture was stretched by up to a pixel (mean error 0.6-0.7 grey levels, edges off by
    up to 45, against 0.2 for even sizes). The resize now maps only the picture."""
    buf = io.BytesIO()
    Image.fromarray(photo(width, height)).save(buf, "JPEG", quality=90)
    reference = decode_for_model(buf.getvalue(), size, fast=False).pixels
    fast = decode_for_model(buf.getvalue(), size, fast=True).pixels
    assert mae(fast, reference) < 0.4


def test_fast_path_non_jpeg_close_to_reference(tmp_path):
    path = save(photo(2000, 1500), tmp_path / "big.png")
    reference = decode_for_model(path, 224, fast=False).pixels
    fast = decode_for_model(path, 224, fast=True).pixels
    assert 0 < mae(fast, reference) < 0.6  # the box pre-reduction ran (not identical) and stayed close


def test_results_pickle(tmp_path):
    path = oriented_jpeg(tmp_path, blocks(), 6)
    decoded = decode_for_model(path, 32)
    again = pickle.loads(pickle.dumps(decoded))
    np.testing.assert_array_equal(again.pixels, decoded.pixels)
    assert again.info == decoded.info
    img = pickle.loads(pickle.dumps(open_image(path)))
    assert img.size == (96, 64)
    error = pickle.loads(pickle.dumps(ImageDecodeError("x")))
    assert isinstance(error, ImageDecodeError)


def test_open_image_draft_side_decodes_jpegs_small_and_close():
    buf = io.BytesIO()
    Image.fromarray(photo(4000, 3000)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    full, small = open_image(data), open_image(data, draft_side=640)
    assert full.size == (4000, 3000) and small.size == (1000, 750)  # DCT scale 1/4: both axes >= 640
    a, b = full.copy(), small.copy()
    a.thumbnail((320, 320), Image.Resampling.LANCZOS)
    b.thumbnail((320, 320), Image.Resampling.LANCZOS)
    assert a.size == b.size == (320, 240)
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() < 1.5
    png = io.BytesIO()
    Image.fromarray(photo(800, 600)).save(png, "PNG")
    assert open_image(png.getvalue(), draft_side=100).size == (800, 600)  # only JPEGs have DCT scales
    with pytest.raises(InvalidInputError, match="positive integer"):
        open_image(data, draft_side=0)


def test_decoded_pixels_reads_what_a_decode_holds_from_the_header():
    """The server reserves a thumbnail's pixels before decoding it: a JPEG's DCT scale counts, other formats are full."""
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo(4000, 3000)).save(jpeg, "JPEG", quality=90)
    Image.fromarray(photo(800, 600)).save(png, "PNG")
    for data, side in ((jpeg.getvalue(), 640), (jpeg.getvalue(), None), (png.getvalue(), 100)):
        width, height = open_image(data, draft_side=side).size
        assert decoded_pixels(data, draft_side=side) == width * height
    assert decoded_pixels(jpeg.getvalue(), draft_side=640) == 1000 * 750
    with pytest.raises(ImageDecodeError, match="decompression bombs"):
        decoded_pixels(png.getvalue(), max_pixels=1000)
    # a JPEG without its end marker is checked with two full-size decodes (jpeg_end): it reserves them (review: 9 such
    # thumbnails of 48 MP took a server from 0.66 to 4.8 GB under a 50 MP budget)
    cut = jpeg.getvalue()[:-2]
    assert open_image(cut, draft_side=640).size == (1000, 750)
    assert decoded_pixels(cut, draft_side=640) == 2 * 4000 * 3000
