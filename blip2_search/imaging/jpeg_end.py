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
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_EOI = b"\xff\xd9"
_FILLER = b"\xd3" + bytes(b % 255 for b in hashlib.sha256(b"blip2-search missing EOI").digest() * 2)[1:]
"""Entropy-coded stand-in for data a cut JPEG lacks: 64 fixed pseudo-random bytes, none 0xFF (no marker), its
first bits unlike libjpeg's fill of zeros."""


def with_end_marker(data: bytes) -> bytes | None:
    """JPEG `data` with its end marker added when that marker is all it lacks; else None (it was cut short).

    The data must end inside the entropy-coded data of its last scan, all its other scans and restart
    intervals whole (`_layout`). Whether the last scan's data is whole is then asked of libjpeg, cheapest first:
    `_last_interval_whole` (files with restart markers), `_extra_row_verdict` (one sequential scan), else
    `_same_pixels` on the whole file, two full-size decodes. Each gives the same answer whatever DCT scale the
    caller decodes at, so the fast and the reference path accept the same files.
    """
    try:
        layout = _layout(data)
        if layout is None:
            return None
        whole = _last_interval_whole(layout)
        if whole is None:
            whole = _extra_row_verdict(layout)
        if whole is None:
            whole = _same_pixels(layout.data)
    except Exception:  # a malformed header or scan: the file stays refused for the reason first found
        return None
    return layout.data + JPEG_EOI if whole else None


def _same_pixels(data: bytes) -> bool:
    """Whether the last scan of `data` needed no bit past its end: libjpeg fills bits missing before a marker
    with zeros, so data ended by the marker decodes whether it is whole or cut; decoded once more with `_FILLER`
    before the marker, a scan that needed no bit past the data gives the same pixels, a cut one other pixels (of
    synthetic JPEGs cut 1 to 13 bytes short, about 1 in 5,000 matched by chance, wrong in its last block only).
    Two decodes at full size: on a 12 MP photo about 200 ms."""
    ended, filled = (_full_pixels(data + tail + JPEG_EOI) for tail in (b"", _FILLER))
    return ended == filled


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})
_ALL_COEFFICIENTS = (1 << 64) - 1
_MAX_SIDE = 65535


@dataclass(frozen=True)
class _Frame:
    marker: int
    offset: int  # of the SOF marker in the file
    precision: int
    height: int
    width: int
    sampling: dict[int, tuple[int, int]]  # component id -> (H, V)


@dataclass(frozen=True)
class _Layout:
    """Where the parts of a JPEG that ends inside the entropy-coded data of its last scan lie."""

    data: bytes  # the file up to the end of that data (0xFF bytes at its end, the start of a marker, left out)
    frame: _Frame
    interval: int  # MCUs per restart interval (DRI), 0 for none
    scans: int
    header: tuple[tuple[int, int, int], ...]  # (marker, start, end) of each segment before the first scan
    scan_components: bytes  # of the last scan
    sos: int  # offset of the last scan's SOS marker
    entropy: int  # where its entropy-coded data begins
    last_interval: int  # where its last restart interval begins (after its last restart marker)


def _layout(data: bytes) -> _Layout | None:
    """The `_Layout` of `data` when it ends inside the entropy-coded data of its last scan, that data holds every
    restart marker of the scan, and its scans bring every coefficient of every component to full precision; else
    None: cut inside or between marker segments, an end marker inside, or whole restart intervals or
    (progressive) scans missing."""
    data = data.rstrip(b"\xff")
    frame: _Frame | None = None
    interval = 0
    scans = 0
    header: list[tuple[int, int, int]] = []
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
        start, end = i, i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if end > len(data):
            return None
        segment = data[i + 4:end]
        i = end
        if not scans and marker != 0xDA:
            header.append((marker, start, end))
        if marker in _SOF_MARKERS and len(segment) >= 6:
            comps = segment[6:6 + 3 * segment[5]]
            frame = _Frame(marker, start, segment[0], int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"),
                           {comps[k]: (comps[k + 1] >> 4, comps[k + 1] & 15) for k in range(0, len(comps) - 2, 3)})
        elif marker == 0xDD and len(segment) >= 2:
            interval = int.from_bytes(segment[:2], "big")
        elif marker == 0xDA and segment and len(segment) >= 4 + 2 * segment[0]:
            scans += 1
            ns = segment[0]
            components, (ss, se, ahal) = segment[1:1 + 2 * ns:2], segment[1 + 2 * ns:4 + 2 * ns]
            if ahal & 15 == 0 and ss <= se <= 63:
                for c in components:
                    coverage[c] = coverage.get(c, 0) | ((1 << (se + 1)) - (1 << ss))
            restarts, last_interval = 0, i
            while True:  # the scan's data: up to the next marker other than a stuffed 0xFF00 or a restart marker
                i = data.find(b"\xff", i)
                if i < 0:
                    whole = frame is not None and all(coverage.get(c) == _ALL_COEFFICIENTS for c in frame.sampling)
                    if not whole or (interval and restarts < _restarts_in_scan(frame, components, interval)):
                        return None
                    return _Layout(data, frame, interval, scans, tuple(header), bytes(components), start, end, last_interval)
                if data[i + 1] == 0x00:
                    i += 2
                elif 0xD0 <= data[i + 1] <= 0xD7:
                    restarts += 1
                    i += 2
                    last_interval = i
                elif data[i + 1] == 0xFF:
                    i += 1
                else:
                    break
    return None


def _mcus_in_scan(frame: _Frame, scan_components: bytes) -> int:
    """MCUs in a whole scan of `scan_components`; 0 for a frame without a height (set later by a DNL marker) or
    an unknown component."""
    if not frame.height or any(c not in frame.sampling for c in scan_components):
        return 0
    h_max, v_max = max(h for h, _ in frame.sampling.values()), max(v for _, v in frame.sampling.values())
    if len(scan_components) == 1:  # not interleaved: one block an MCU
        h, v = frame.sampling[scan_components[0]]
        return math.ceil(math.ceil(frame.width * h / h_max) / 8) * math.ceil(math.ceil(frame.height * v / v_max) / 8)
    return math.ceil(frame.width / (8 * h_max)) * math.ceil(frame.height / (8 * v_max))


def _restarts_in_scan(frame: _Frame, scan_components: bytes, interval: int) -> int:
    """How many restart markers a whole scan of `scan_components` has: one between each two intervals of
    `interval` MCUs. A scan whose MCUs cannot be counted counts as more than any file has."""
    mcus = _mcus_in_scan(frame, scan_components)
    return math.ceil(mcus / interval) - 1 if mcus else 1 << 62


def _one_sequential_scan(layout: _Layout) -> bool:
    """Whether `layout` is an 8-bit Huffman-coded JPEG of one sequential scan of all its components: the files the
    two checks below understand (progressive and multi-scan files keep to `_same_pixels`)."""
    frame = layout.frame
    return (frame.marker in _SEQUENTIAL_HUFFMAN and frame.precision == 8 and layout.scans == 1
            and sorted(layout.scan_components) == sorted(frame.sampling) and _mcus_in_scan(frame, layout.scan_components) > 0)


def _last_interval_whole(layout: _Layout) -> bool | None:
    """`_same_pixels` of the last restart interval alone, None where the file has no restart markers (or the
    interval is too long for one row of a JPEG frame).

    Each interval starts byte-aligned with its DC predictors reset, and `_layout` saw every earlier interval
    end in its restart marker, so the interval the data ends in can be decoded on its own: the file's tables and
    a frame one MCU high and as many MCUs wide as the interval has, a few kB decoded twice."""
    if not layout.interval or not _one_sequential_scan(layout):
        return None
    frame, data = layout.frame, layout.data
    mcus = _mcus_in_scan(frame, layout.scan_components)
    count = mcus - _restarts_in_scan(frame, layout.scan_components, layout.interval) * layout.interval
    if len(frame.sampling) == 1:  # not interleaved: an MCU is one 8x8 block
        width, height = 8 * count, 8
    else:
        width = 8 * count * max(h for h, _ in frame.sampling.values())
        height = 8 * max(v for _, v in frame.sampling.values())
    if not 0 < width <= _MAX_SIDE:
        return None
    parts = [data[:2]]
    for marker, start, end in layout.header:
        if marker == 0xDD:
            continue  # the interval is the whole scan now
        if start == frame.offset:
            parts.append(_with_size(data[start:end], height, width))
        else:
            parts.append(data[start:end])
    return _same_pixels(b"".join(parts) + data[layout.sos:layout.entropy] + data[layout.last_interval:])


def _extra_row_verdict(layout: _Layout) -> bool | None:
    """Whether the scan's data is whole, decided from decodes at 1/8 scale (about a quarter of a full decode
    each) with one more row of MCUs declared in the frame: True, False, or None where they cannot tell.

    libjpeg decodes past the data only with zero bits after the marker, and from the MCU that first needs one
    on it decodes nothing more of the scan (zero coefficients: the grey of value 128). A cut file thus leaves
    the added row grey; a whole one decodes the row's first MCU from its padding bits and zeros, which gives
    a grey row only where the picture's last blocks have DC values that make it so (a grey corner). Then the
    row is decoded once more after `_FILLER`: pixels above the row that differ show a cut file."""
    frame = layout.frame
    if not _one_sequential_scan(layout) or not _no_vertical_upsampling(frame):
        return None
    unit = 8 if len(frame.sampling) == 1 else 8 * max(v for _, v in frame.sampling.values())
    rows = math.ceil(frame.height / unit)
    if (rows + 1) * unit > _MAX_SIDE:
        return None
    data = layout.data
    sof_end = next(end for _, start, end in layout.header if start == frame.offset)
    extended = data[:frame.offset] + _with_size(data[frame.offset:sof_end], (rows + 1) * unit, frame.width) + data[sof_end:]
    ended = _eighth_scale_pixels(extended + JPEG_EOI)
    if ended is None:
        return None
    split = rows * unit // 8
    if (ended[split:] != 128).any():
        return True
    filled = _eighth_scale_pixels(extended + _FILLER + JPEG_EOI)
    if filled is not None and not np.array_equal(ended[:split], filled[:split]):
        return False
    return None


def _no_vertical_upsampling(frame: _Frame) -> bool:
    """Whether libjpeg decodes every component of `frame` at 1/8 scale without mixing rows of samples: it
    scales a subsampled component's IDCT up by powers of 2 while that divides both of its ratios, and upsamples
    the rest; upsampling across rows (4:4:0, say) would mix the declared extra row into the picture's last."""
    h_max, v_max = max(h for h, _ in frame.sampling.values()), max(v for _, v in frame.sampling.values())
    for h, v in frame.sampling.values():
        if not h or not v:
            return False
        scale = 1
        while scale < 8 and h_max % (h * scale * 2) == 0 and v_max % (v * scale * 2) == 0:
            scale *= 2
        if v * scale != v_max:
            return False
    return True


def _eighth_scale_pixels(data: bytes) -> np.ndarray | None:
    """JPEG `data` decoded at 1/8 scale, as stored, when it decodes to 8-bit grey or RGB (where zero
    coefficients give 128 in every channel) and at that scale; else None."""
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        if im.mode not in ("L", "RGB"):
            return None
        width, height = im.size
        im.draft(im.mode, (1, 1))
        if im.size != (math.ceil(width / 8), math.ceil(height / 8)):
            # Pillow scales by less where a side is under 8 px: the rows would not be where the caller looks,
            # and a subsampled component would be upsampled across the extra row
            return None
        im.load()
        return np.asarray(im)


def _with_size(sof: bytes, height: int, width: int) -> bytes:
    """SOF segment `sof` (marker included) declaring a frame of height x width."""
    return sof[:5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + sof[9:]


def _full_pixels(data: bytes) -> bytes:
    """The pixels of JPEG `data` decoded at full size, as stored (no colour conversion)."""
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        im.load()
        return im.tobytes()
