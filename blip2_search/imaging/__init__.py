"""Image decoding for indexing and display: formats, EXIF orientation, fast JPEG path, bomb cap.

Modules: `sources` (paths, bytes, file objects and their errors), `color` (any mode to 8-bit RGB),
`metadata` (`ImageInfo`, EXIF), `jpeg_end` (a JPEG missing only its end marker), `decode` (the public
functions re-exported here).
"""

from .decode import (
    DEFAULT_MAX_PIXELS,
    DRAFT_OVERSAMPLE,
    REDUCING_GAP,
    DecodedImage,
    decode_for_model,
    model_draft_side,
    model_image,
    decoded_pixels,
    open_image,
    read_info,
    upright_rgb,
)
from .metadata import ImageInfo
from .sources import ImageSource

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
