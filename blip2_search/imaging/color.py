"""Turn a decoded image of any Pillow mode into 8-bit RGB.

Alpha and transparency are composited onto white (a transparent logo shows as it does on a web
page, not as a black blob). 16-bit and 32-bit data are scaled to 8 bits, not clipped: Pillow's own
`convert("L")` clips "I;16" at 255, which turns most 16-bit images white.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
WHITE = (255, 255, 255)


def to_rgb(im: Image.Image, name: str) -> Image.Image:
    """An RGB image with the pixels of the loaded image `im` (which it may return unchanged).

    Modes: CMYK (Adobe-inverted CMYK JPEGs are un-inverted by Pillow's reader), 16/32-bit integer
    and float greyscale (scaled, see `high_depth_to_l`), palette with transparency, alpha modes
    (composited onto white), L, 1, LAB, YCbCr, HSV, RGBX. `name` is only used in error messages.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _HIGH_DEPTH_MODES:
        return high_depth_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return composite_on_white(im if mode == "RGBA" else im.convert("RGBA"))
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(
            f"cannot decode image {name}: colour mode {mode!r} has no RGB conversion; convert the file to RGB JPEG or PNG"
        ) from exc


def composite_on_white(rgba: Image.Image) -> Image.Image:
    """RGB of an RGBA image laid over a white background: out = rgb * a + 255 * (1 - a)."""
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, WHITE)
    out.paste(rgba.convert("RGB"), mask=alpha)
    return out


def high_depth_to_l(values: np.ndarray) -> np.ndarray:
    """Scale a 2-D greyscale array [h, w] (uint16, int32 or float32) to uint8 [h, w].

    uint16 spans 0..65535 and maps to round(v / 257). For int32 and float data the nominal range is
    picked from the values: floats within 0..1 scale by 255; values within 0..255 are kept; within
    0..65535 divide by 257; anything else (negative or wider) is stretched min..max onto 0..255.
    NaN becomes 0.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if values.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        scaled = data * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = data
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = data / 257.0
    else:
        scaled = (data - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """RGB of an "I;16*", "I" or "F" image, scaled by `high_depth_to_l`; a tRNS value shows as white."""
    values = np.asarray(im)
    grey = high_depth_to_l(values)
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):
        grey = np.where(values == transparent, np.uint8(255), grey)
    return Image.fromarray(grey, "L").convert("RGB")
