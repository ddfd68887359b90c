"""Decode image files for the model and for display: upright, RGB, size-capped, one error type.

`open_image` is the full-resolution decode. `decode_for_model` gives the [size, size, 3] uint8
pixels the BLIP-2 image processor would make (RGB, straight to size x size with the processor's
resample filter, bicubic in BLIP-2's checkpoints, aspect not kept); with `fast=True` a JPEG is
decoded at 1/2, 1/4 or 1/8 scale inside libjpeg (DCT scaling, `Image.draft`): on 12 MP photos
3-4x faster than the reference path (about 6x faster than PIL full decode + HF
`BlipImageProcessorPil`), differing from it by ~0.2 grey levels on average (bench/decode.py).

Every failure that depends on the file raises `ImageDecodeError` with a one-line message that names
the file, the reason and the fix. Pillow's warnings (decompression bomb, corrupt EXIF) are
silenced inside these calls; the bomb check is ours, done on the header before any pixel is
decoded. Results hold no references to open files and pickle, so worker processes can return them.
The warning filters are swapped for the duration of a call (`warnings.catch_warnings`), which is
process-wide: in a multi-threaded caller a warning raised by another thread meanwhile may be lost.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ..errors import Blip2SearchError, ImageDecodeError, InvalidInputError
from .color import to_rgb
from .jpeg_end import JPEG_EOI, with_end_marker
from .metadata import ImageInfo, forget_orientation, image_info, orientation_of, read_exif, upright
from .sources import IMAGE_EXTENSIONS, ImageSource, OpenedSource, ensure_heif_plugin, open_source, sniff

DEFAULT_MAX_PIXELS = 160_000_000
"""Largest image decoded by default (width x height of the stored image), 160 MP.

Above every camera still in common use (100-102 MP medium format, 151 MP Phase One IQ4) and
phone panoramas, below Pillow's hard limit (2 x `PIL.Image.MAX_IMAGE_PIXELS` = 179 MP), so a
single limit applies without touching Pillow's globals. A full RGB decode at the cap needs
~480 MB per worker; a 1-gigapixel bomb (3 GB) is refused from its header.
"""

DRAFT_OVERSAMPLE = 2.0
"""Fast path: the DCT-scaled JPEG keeps at least this many pixels per output pixel on each axis.

Measured on 4000x3000 q90 photos against the reference path (bench/decode.py, 2 shared cores):
2.0 decodes at 1/4 scale: 224 px MAE 0.18 grey levels (PSNR 55.7 dB, max 2), 48 vs 163 ms;
364 px MAE 0.28 (53.5 dB, max 5). 1.5 decodes at 1/8 scale for 224 px: MAE 0.42 (50.5 dB, max 9),
34 ms, i.e. ~30% less time. 1.0 at 364 px (375 px rows left) gives MAE 0.8 with edge errors of 39.
"""

REDUCING_GAP = 3.0
"""Fast path: `Image.resize(reducing_gap=...)`; a box pre-reduction while the image stays >= 3x the
output. It does nothing after a JPEG draft of a 12 MP photo; on a full 12 MP PNG it cuts the resize
from ~68 to ~16 ms at a mean abs error of ~0.17 grey levels.
"""

# Formats decoded; others Pillow knows (EPS, ICO, TGA, ...) are refused as unsupported, which keeps
# rarely-audited parsers away from untrusted files. HEIF is registered by pillow-heif on demand.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "HEIF", "JPEG2000", "PPM")
_DRAFTABLE = frozenset({"JPEG", "MPO"})
_RESAMPLE_FILTERS = frozenset(int(f) for f in Image.Resampling)
_SUPPORTED_LABELS = frozenset(ALLOWED_FORMATS) | {"HEIF/AVIF"}
_PILLOW_PIXELS_RE = re.compile(r"\((\d+) pixels\)")
_QUIET_MODULES = r"(PIL|pillow_heif|blip2_search)(\.|$)"


@dataclass(frozen=True)
class DecodedImage:
    """Model-ready pixels of one image and its metadata.

    pixels: [size, size, 3] uint8 RGB, upright, resized straight to size x size (with the processor's
        resample filter); not rescaled or normalised (the model's processor constants do that).
    info: the file's `ImageInfo` (full-resolution upright size, format, EXIF date and camera).
    """

    pixels: np.ndarray
    info: ImageInfo


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes or binary file) to a fully loaded, upright RGB image.

    EXIF orientation is applied (as `ImageOps.exif_transpose` does) and removed from the result's
    metadata; alpha is composited onto white; the first frame of animations is used.
    `draft_side` (for previews): a JPEG may be decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps both axes >= draft_side, which skips most of the decoding work; other formats decode in full.
    Raises `ImageDecodeError` for any problem with the file, including more than `max_pixels`.
    """
    _check_max_pixels(max_pixels)
    if draft_side is not None and (isinstance(draft_side, bool) or not isinstance(draft_side, int) or draft_side < 1):
        raise InvalidInputError(f"draft_side {draft_side!r} is not a positive integer; pass the smallest side the caller needs, or None")
    im, orientation, _, _ = _decode(source, max_pixels=max_pixels, draft_side=draft_side)
    return _upright_rgb(im, orientation)


def decoded_pixels(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int | None = None) -> int:
    """How many pixels `open_image(source, draft_side=draft_side)` decodes, read from the header alone
    (a JPEG's DCT scale included): what a caller that bounds decoding memory reserves before decoding.
    Raises `ImageDecodeError` as `open_image` would for an unreadable header or a bomb."""
    _check_max_pixels(max_pixels)
    with open_source(source) as src, _pillow_errors(src):
        im = _open_capped(src, max_pixels)
        full = im.size[0] * im.size[1]
        if draft_side is not None and im.format in _DRAFTABLE:
            im.draft("RGB", (draft_side, draft_side))  # sets the scale only; nothing is decoded
        width, height = im.size
        if im.format in _DRAFTABLE and not _ends_with_eoi(src):  # `jpeg_end` may check it with two full-size decodes
            return max(width * height, 2 * full)
        return width * height


def _ends_with_eoi(src: OpenedSource) -> bool:
    """Whether a JPEG's stream ends with its end marker (True where the stream cannot tell: not seekable); the
    stream is left where it was."""
    try:
        position = src.stream.tell()
        src.stream.seek(-2, 2)
        ends = src.stream.read(2) == JPEG_EOI
        src.stream.seek(position)
        return ends
    except (OSError, ValueError):
        return True


def upright_rgb(im: Image.Image, name: str = "<image>") -> Image.Image:
    """An in-memory PIL image made what `open_image` makes of a file: upright (EXIF orientation applied)
    8-bit RGB, alpha on white, 16-bit and CMYK converted as for files (not PIL's clipping `convert`)."""
    try:
        im.load()
    except ValueError as exc:
        if "closed image" not in str(exc):
            raise ImageDecodeError(f"cannot decode image {name}: {_failure_reason(exc, im.format)}") from exc
        raise InvalidInputError(f"image {name} is a closed PIL image; pass it before closing it, or open the file again") from None
    except Exception as exc:  # a lazily opened file that is truncated or corrupt
        raise ImageDecodeError(f"cannot decode image {name}: {_failure_reason(exc, im.format)}") from exc
    if not im.width or not im.height:  # resized to the model's size it would score as a black picture
        raise ImageDecodeError(f"cannot use image {name}: it is empty ({im.width}x{im.height} pixels); pass a picture with pixels "
                               "(a crop box of no width or height makes an empty one)")
    orientation = orientation_of(read_exif(im))
    return _upright_rgb(to_rgb(im, name), orientation)


def decode_for_model(
    source: ImageSource,
    size: int,
    resample: int = Image.Resampling.BICUBIC,
    *,
    fast: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    oversample: float = DRAFT_OVERSAMPLE,
) -> DecodedImage:
    """Decode `source` to [size, size, 3] uint8 RGB as BLIP's image processor resizes it.

    `resample`: the processor's PIL filter (its `resample` setting; bicubic in BLIP-2's checkpoints).
    fast=False is the reference: `open_image`, then `resize((size, size), resample)`, as the processor's PIL backend.
    fast=True decodes JPEGs with DCT scaling to no less than `oversample * size` pixels per axis,
    resizes with `reducing_gap=REDUCING_GAP`, then applies the EXIF orientation to the small result
    (a square resize commutes with the transpose up to rounding). Other formats skip the DCT step; with
    nearest it is the reference (see `model_draft_side`).
    """
    _check_max_pixels(max_pixels)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"model image size {size!r} is not a positive integer; pass the processor's image size, e.g. 224")
    if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _RESAMPLE_FILTERS:
        raise InvalidInputError(f"resample {resample!r} is not a PIL resampling filter; pass the processor's resample, e.g. "
                                f"{int(Image.Resampling.BICUBIC)} (bicubic)")
    if not (isinstance(oversample, (int, float)) and math.isfinite(oversample) and oversample >= 1.0):
        raise InvalidInputError(f"oversample {oversample!r} is not a finite number >= 1; pass e.g. {DRAFT_OVERSAMPLE}")
    if not fast or model_draft_side(size, resample, oversample) is None:
        im, orientation, info, _ = _decode(source, max_pixels=max_pixels, draft_side=None)
        small = _upright_rgb(im, orientation).resize((size, size), resample)
    else:
        im, orientation, info, box = _decode(source, max_pixels=max_pixels, draft_side=math.ceil(oversample * size))
        resized = im.resize((size, size), resample, box=box, reducing_gap=REDUCING_GAP)
        small = upright(resized, orientation)
    return DecodedImage(pixels=np.array(small, dtype=np.uint8), info=info)


def model_draft_side(size: int, resample: int, oversample: float = DRAFT_OVERSAMPLE) -> int | None:
    """The side `decode_for_model(fast=True)` decodes a JPEG to (pass it to `decoded_pixels`): `oversample * size`, or
    None, a full decode, for nearest. Nearest picks single pixels, which a DCT-scaled or pre-reduced (averaged)
    image does not hold: on a 12 MP photo-like JPEG that was 3.1 grey levels off the processor on average and
    up to 127, against 0.2-0.6 for the other filters."""
    return None if resample == Image.Resampling.NEAREST else math.ceil(oversample * size)


def model_image(source: ImageSource, size: int, resample: int = Image.Resampling.BICUBIC, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`decode_for_model` (the fast path, as `index` decodes) as a size x size PIL image, for the paths that hand a
    model's processor a file: it resizes an image already at its size to itself, so a photo gets the very input its
    stored vectors and ViT tokens were made from, wherever it is read (rerank, `similar`, uploads), and only a
    model-sized copy of it is kept. Raises like `decode_for_model`."""
    return Image.fromarray(decode_for_model(source, size, resample=resample, max_pixels=max_pixels).pixels)


def read_info(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """`ImageInfo` of `source` from its header and EXIF, without decoding the pixels.

    Cheap for JPEG, HEIF, WebP and TIFF; PNG keeps EXIF after the pixels, so a PNG is decoded.
    Does not detect truncated pixel data; `open_image` or `decode_for_model` do.
    """
    _check_max_pixels(max_pixels)
    with open_source(source) as src, _pillow_errors(src):
        im = _open_capped(src, max_pixels)
        exif = read_exif(im)
        return image_info(im.format, im.size, orientation_of(exif), exif)


def _decode(
    source: ImageSource, *, max_pixels: int, draft_side: int | None
) -> tuple[Image.Image, int, ImageInfo, tuple[float, float, float, float] | None]:
    """Load the image RGB as stored (not yet upright); return it, its EXIF orientation, info and the box its
    picture fills (see `_load_capped`).

    With `draft_side`, a JPEG is decoded at the smallest DCT scale keeping both axes >= draft_side.
    """
    with open_source(source) as src, _pillow_errors(src):
        if sniff(src.prefix) == "JPEG" and not _ends_with_eoi(src):
            _open_capped(src, max_pixels)  # the bomb check first: `jpeg_end` may decode the picture at full size
            src = _ended(src)
        im, stored_size, box = _load_capped(src, max_pixels, draft_side)
        file_format = im.format
        exif = read_exif(im)
        orientation = orientation_of(exif)
        info = image_info(file_format, stored_size, orientation, exif)
        return to_rgb(im, src.name), orientation, info, box


def _ended(src: OpenedSource) -> OpenedSource:
    """`src` with its end marker added when that is all it lacks (`jpeg_end`); else `src` as it was, which Pillow
    decodes if it has data after its end marker and refuses as truncated if it was cut short. Checked before
    decoding: a decode that failed first for want of the marker cost as much as the decode itself."""
    src.stream.seek(0)
    complete = with_end_marker(src.stream.read())
    src.stream.seek(0)
    return src if complete is None else replace(src, stream=io.BytesIO(complete))


def _load_capped(
    src: OpenedSource, max_pixels: int, draft_side: int | None
) -> tuple[Image.Image, tuple[int, int], tuple[float, float, float, float] | None]:
    """`_open_capped`, then load the pixels (a JPEG at the smallest DCT scale keeping both axes >= `draft_side`);
    return the image, its size as stored, and the box its picture fills where that is not all of it.

    A DCT-scaled width or height is the stored one divided and rounded up (641 px at 1/2: 321), its last column
    or row holding part of a pixel: the box (0, 0, 320.5, ...) makes a resize map the picture, not that padding,
    onto its output (641x479 to 64 px: mean error against the reference path 0.59 grey levels without it,
    0.21 with it)."""
    im = _open_capped(src, max_pixels)
    stored_size = im.size
    box = None
    if draft_side is not None and im.format in _DRAFTABLE:
        drafted = im.draft("RGB", (draft_side, draft_side))
        if drafted is not None and drafted[1] != (0, 0, *im.size):
            box = tuple(float(v) for v in drafted[1])
    im.load()
    return im, stored_size, box


def _open_capped(src: OpenedSource, max_pixels: int) -> Image.Image:
    """Identify the image from its header and refuse it if it has more than `max_pixels` pixels."""
    label = sniff(src.prefix)
    if label in ("HEIF", "HEIF/AVIF"):
        ensure_heif_plugin(src.name, required=label == "HEIF")
    Image.init()
    im = Image.open(src.stream, formats=[f for f in ALLOWED_FORMATS if f in Image.OPEN])
    width, height = im.size
    limit = _effective_limit(max_pixels)
    if width * height > limit:
        raise ImageDecodeError(
            f"cannot decode image {src.name}: {width}x{height} is {_megapixels(width * height)}, over the "
            f"{_megapixels(limit)} limit that guards against decompression bombs; if you trust the file, save a copy "
            f"below {_megapixels(limit)} (in Python, open_image takes a larger max_pixels)"
        )
    return im


def _upright_rgb(im: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return im
    out = upright(im, orientation)
    forget_orientation(out)
    return out


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _effective_limit(max_pixels: int) -> int:
    """Our cap, never above Pillow's hard limit (which raises inside `Image.open` regardless)."""
    pillow_max = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_max is None else min(max_pixels, 2 * pillow_max)


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InvalidInputError(f"max_pixels {max_pixels!r} is not a positive integer; pass e.g. {DEFAULT_MAX_PIXELS}")


@contextmanager
def _pillow_errors(src: OpenedSource) -> Iterator[None]:
    """Silence Pillow's warnings and turn anything a decoder raises into `ImageDecodeError`.

    Pillow plugins raise OSError, SyntaxError, ValueError, struct.error, EOFError, ... on
    malformed data; callers must see one exception type.
    """
    name, label = src.name, sniff(src.prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        try:
            yield
        except Blip2SearchError:
            raise
        except Image.UnidentifiedImageError as exc:
            raise ImageDecodeError(f"cannot decode image {name}: {_unidentified_reason(label, src.suffix)}") from exc
        except Image.DecompressionBombError as exc:
            found = _PILLOW_PIXELS_RE.search(str(exc))
            pixels = _megapixels(int(found.group(1))) if found else "too many pixels"
            raise ImageDecodeError(
                f"cannot decode image {name}: {pixels}, over Pillow's decompression-bomb limit; if you trust the file, "
                "save a smaller copy (in Python, raise PIL.Image.MAX_IMAGE_PIXELS and open_image's max_pixels)"
            ) from exc
        except MemoryError as exc:
            raise ImageDecodeError(
                f"cannot decode image {name}: out of memory while decoding; lower max_pixels or run fewer decode workers"
            ) from exc
        except Exception as exc:
            raise ImageDecodeError(f"cannot decode image {name}: {_failure_reason(exc, label)}") from exc


def _unidentified_reason(label: str | None, suffix: str) -> str:
    if label is None:
        despite = f" despite its {suffix!r} extension" if suffix.lower() in IMAGE_EXTENSIONS else ""  # a .txt is no surprise
        return f"not an image file (content not recognised{despite}); replace it with an image file, or remove it"
    if label in _SUPPORTED_LABELS:
        return f"corrupt or truncated {label} file (its header cannot be parsed); re-copy or re-export it"
    return f"unsupported format ({label}); convert it to JPEG or PNG"


def _failure_reason(exc: Exception, label: str | None) -> str:
    text = " ".join(str(exc).split())[:160] or type(exc).__name__
    kind = label or "image"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"read error ({exc.strerror or text}); check the disk or network share and retry"
    if "truncated" in text.lower():
        return f"{kind} file is truncated (the data ends early); re-copy the file or re-export it from the original"
    if "not available" in text.lower() or "unsupported" in text.lower():
        return f"unsupported {kind} encoding ({text}); convert it to JPEG or PNG"
    return f"corrupt {kind} data ({type(exc).__name__}: {text}); re-copy or re-export the file"
