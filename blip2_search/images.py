"""Decoding photos for the index: the public face of `blip2_search.imaging`.

`open_image` gives an upright RGB image (`upright_rgb` makes the same of an in-memory PIL image); `decode_for_model` gives the [size, size, 3] uint8
pixels BLIP-2's processor would resize to (fast JPEG path by default), `model_image` the same as a PIL image (what
every path that gives a model a file uses, so a photo gets one input); `read_info` reads the
size, format, EXIF date and camera without decoding pixels; `decoded_pixels` says from the header how
many pixels a decode will hold. All raise `ImageDecodeError`.
"""

from .imaging import (
    DEFAULT_MAX_PIXELS,
    DRAFT_OVERSAMPLE,
    REDUCING_GAP,
    DecodedImage,
    ImageInfo,
    ImageSource,
    decode_for_model,
    model_draft_side,
    model_image,
    decoded_pixels,
    open_image,
    read_info,
    upright_rgb,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DRAFT_OVERSAMPLE",
    "REDUCING_GAP",
    "DecodedImage",
    "ImageInfo",
    "ImageSource",
    "decode_for_model",
    "model_draft_side",
    "model_image",
    "decoded_pixels",
    "open_image",
    "read_info",
    "upright_rgb",
]
