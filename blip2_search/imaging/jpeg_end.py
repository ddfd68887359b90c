"""JPEG files whose only defect is a missing end-of-image (EOI) marker, told from files cut short.

Some cameras and transfer tools leave the final two bytes (0xFFD9) out; viewers show such a file whole, and
Pillow decodes it pixel for pixel once told to load truncated images, but without that (a process-wide switch)
it calls the file truncated, like one whose copy stopped halfway. `with_end_marker` gives back the bytes with
the marker added only when nothing else is missing.
"""

from __future__ import annotations

import hashlib
import io
import math

from PIL import Image

JPEG_EOI = b"\xff\xd9"
_FILLER = b"\xd3" + bytes(b % 255 for b in hashlib.sha256(b"blip2-search missing EOI").digest() * 2)[1:]
"""Entropy-coded stand-in for data a cut JPEG lacks: 64 fixed pseudo-random bytes, none 0xFF (no marker), its
first bits unlike libjpeg's fill of zeros."""


def with_end_marker(data: bytes) -> bytes | None:
    """JPEG `data` with its end marker added when that marker is all it lacks; else None (it was cut short).

    The data must end inside the entropy-coded data of its last scan, all its other scans and restart
    intervals whole (`_scan_data_end`). libjpeg fills bits missing before a marker with zeros, so data ended by
    the marker decodes whether it is whole or cut; decoded once more with `_FILLER` before the marker, a scan
    that needed no bit past the data gives the same pixels, a cut one other pixels (of synthetic JPEGs cut 1 to
    13 bytes short, about 1 in 5,000 matched by chance, wrong in its last block only). Both decodes are at full
    size, so callers that decode at a DCT scale and those that do not accept the same files. Costs two full
    decodes, only for JPEGs that end early: a 12 MP photo without its marker took 250 ms on the fast path, 35 ms
    with it (one core).
    """
    try:
        data = _scan_data_end(data)
        if data is None:
            return None
        ended, filled = (_full_pixels(data + tail + JPEG_EOI) for tail in (b"", _FILLER))
    except Exception:  # a malformed header or scan: the file stays refused for the reason first found
        return None
    return data + JPEG_EOI if ended == filled else None


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_ALL_COEFFICIENTS = (1 << 64) - 1


def _scan_data_end(data: bytes) -> bytes | None:
    """JPEG `data` (0xFF bytes at its end, the start of a marker, left out) when it ends inside the entropy-coded
    data of its last scan, that data holds every restart marker of the scan, and its scans bring every
    coefficient of every component to full precision; else None: cut inside or between marker segments, an end
    marker inside, or whole restart intervals or (progressive) scans missing."""
    data = data.rstrip(b"\xff")
    frame: tuple[int, int, dict[int, tuple[int, int]]] | None = None  # height, width, component id -> sampling (H, V)
    interval = 0  # MCUs per restart interval (DRI), 0 for none
    coverage: dict[int, int] = {}  # component id -> bit mask of the coefficients a scan gave their last bit (Al = 0)
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # an end marker inside: another defect (or several images)
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if end > len(data):
            return None
        segment = data[i + 4:end]
        i = end
        if marker in _SOF_MARKERS and len(segment) >= 6:
            comps = segment[6:6 + 3 * segment[5]]
            frame = (int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"),
                     {comps[k]: (comps[k + 1] >> 4, comps[k + 1] & 15) for k in range(0, len(comps) - 2, 3)})
        elif marker == 0xDD and len(segment) >= 2:
            interval = int.from_bytes(segment[:2], "big")
        elif marker == 0xDA and segment and len(segment) >= 4 + 2 * segment[0]:
            ns = segment[0]
            components, (ss, se, ahal) = segment[1:1 + 2 * ns:2], segment[1 + 2 * ns:4 + 2 * ns]
            if ahal & 15 == 0 and ss <= se <= 63:
                for c in components:
                    coverage[c] = coverage.get(c, 0) | ((1 << (se + 1)) - (1 << ss))
            restarts = 0
            while True:  # the scan's data: up to the next marker other than a stuffed 0xFF00 or a restart marker
                i = data.find(b"\xff", i)
                if i < 0:
                    whole = frame is not None and all(coverage.get(c) == _ALL_COEFFICIENTS for c in frame[2])
                    if not whole or (interval and restarts < _restarts_in_scan(frame, components, interval)):
                        return None
                    return data
                if data[i + 1] == 0x00:
                    i += 2
                elif 0xD0 <= data[i + 1] <= 0xD7:
                    restarts += 1
                    i += 2
                elif data[i + 1] == 0xFF:
                    i += 1
                else:
                    break
    return None


def _restarts_in_scan(frame: tuple[int, int, dict[int, tuple[int, int]]], scan_components: bytes, interval: int) -> int:
    """How many restart markers a whole scan of `scan_components` has: one between each two intervals of
    `interval` MCUs. A frame without a height (set later by a DNL marker) or an unknown component counts as
    more than any file has."""
    height, width, sampling = frame
    if not height or any(c not in sampling for c in scan_components):
        return 1 << 62
    h_max, v_max = max(h for h, _ in sampling.values()), max(v for _, v in sampling.values())
    if len(scan_components) == 1:  # not interleaved: one block an MCU
        h, v = sampling[scan_components[0]]
        mcus = math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
    else:
        mcus = math.ceil(width / (8 * h_max)) * math.ceil(height / (8 * v_max))
    return math.ceil(mcus / interval) - 1


def _full_pixels(data: bytes) -> bytes:
    """The pixels of JPEG `data` decoded at full size, as stored (no colour conversion)."""
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        im.load()
        return im.tobytes()
