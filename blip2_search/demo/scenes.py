"""The synthetic scene language: one filled shape on a plain light background.

A scene is (color, shape, position); its caption is ``a {color} {shape} on the {position}``, which gives
72 captions. Renders vary the way photos do (canvas 64-1024 px, aspect 16:9 to 9:16, light background
with mild noise, JPEG or PNG, small jitter of colour, size and position) so that the demo models trained
on them are checked on meaning, not on one fixed picture.

Geometry (all renders):
- the shape's size (side of its bounding square: square side, circle diameter, triangle base and height)
  is 15-35% of the canvas' shorter side;
- its centre (the centre of that bounding square) lies in the left / right third of the width and the
  middle third of the height, or in the top / bottom third of the height and the middle third of the
  width; the sampler keeps a margin from the thirds' borders so that no render is ambiguous, and keeps
  the whole shape on the canvas.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ALL_CAPTIONS",
    "ALL_SCENES",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "RenderInfo",
    "Scene",
    "encode",
    "random_scene",
    "render",
    "render_encoded",
    "render_with_info",
    "sample_canvas",
    "write_folder",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

MIN_CANVAS, MAX_CANVAS = 64, 1024
MAX_ASPECT = 16 / 9
SIZE_RANGE = (0.15, 0.35)  # shape size as a fraction of the canvas' shorter side
BACKGROUND_RANGE = (180, 250)  # each background channel
COLOR_JITTER = 12  # +- per channel around the colour's base RGB
NOISE_STD_MAX = 4.0  # background/shape noise, per pixel, in 0-255 units
JPEG_QUALITY = (60, 95)
PNG_PROBABILITY = 0.3

# Where a centre may fall, as fractions of (width, height): inside the named third with a margin
# from its borders (the thirds are 0-1/3, 1/3-2/3, 2/3-1).
_OUTER = (0.06, 0.28)  # along the axis that names the position (left third; mirrored for right)
_MIDDLE = (0.40, 0.60)  # across it (inside the middle third)


@dataclass(frozen=True)
class Scene:
    """One scene of the language; ``caption`` is its only correct description."""

    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        if self.color not in COLORS or self.shape not in SHAPES or self.position not in POSITIONS:
            raise ValueError(
                f"unknown scene {self.color!r} {self.shape!r} {self.position!r}; "
                f"use colors {list(COLORS)}, shapes {list(SHAPES)}, positions {list(POSITIONS)}"
            )

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on the {self.position}"

    @property
    def index(self) -> int:
        """Index of this scene in ``ALL_SCENES`` / ``ALL_CAPTIONS``."""
        return _SCENE_INDEX[self]

    def replace(self, **attrs: str) -> Scene:
        """A copy with some attributes changed, e.g. ``scene.replace(shape="square")``."""
        values = {"color": self.color, "shape": self.shape, "position": self.position, **attrs}
        return Scene(**values)

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """Parse ``a {color} {shape} on the {position}``; raises ValueError for anything else."""
        words = caption.strip().lower().split()
        if len(words) != 6 or words[0] != "a" or words[3:5] != ["on", "the"]:
            raise ValueError(f"not a scene caption: {caption!r}; expected 'a COLOR SHAPE on the POSITION'")
        return cls(words[1], words[2], words[5])


ALL_SCENES: tuple[Scene, ...] = tuple(Scene(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS)
ALL_CAPTIONS: tuple[str, ...] = tuple(s.caption for s in ALL_SCENES)
_SCENE_INDEX = {s: i for i, s in enumerate(ALL_SCENES)}


@dataclass(frozen=True)
class RenderInfo:
    """What ``render_with_info`` drew, in canvas pixels (for tests and debugging)."""

    canvas: tuple[int, int]  # (width, height)
    center: tuple[float, float]  # (x, y) of the shape's bounding-square centre
    size: float  # side of the shape's bounding square
    background: tuple[int, int, int]
    fill: tuple[int, int, int]
    noise_std: float


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn uniformly from the 72."""
    return ALL_SCENES[int(rng.integers(len(ALL_SCENES)))]


def sample_canvas(rng: np.random.Generator) -> tuple[int, int]:
    """A canvas (width, height): both sides in 64-1024 px, aspect between 9:16 and 16:9."""
    aspect = float(np.exp(rng.uniform(0.0, np.log(MAX_ASPECT))))
    long_side = float(np.exp(rng.uniform(np.log(MIN_CANVAS * aspect), np.log(MAX_CANVAS))))
    long_px = int(round(long_side))
    short_px = int(np.clip(round(long_side / aspect), MIN_CANVAS, MAX_CANVAS))
    return (long_px, short_px) if rng.random() < 0.5 else (short_px, long_px)


def _center(position: str, width: int, height: int, size: float, rng: np.random.Generator):
    along = rng.uniform(*_OUTER)
    across = rng.uniform(*_MIDDLE)
    if position in ("left", "right"):
        extent, fx, fy = width, along, across
    else:
        extent, fx, fy = height, across, along
    # keep the whole shape on the canvas: the outer margin is at least half the shape
    lo = (size / 2 + 2) / extent
    if position in ("left", "right"):
        fx = max(fx, lo)
        fx = 1.0 - fx if position == "right" else fx
    else:
        fy = max(fy, lo)
        fy = 1.0 - fy if position == "bottom" else fy
    return fx * width, fy * height


def render_with_info(
    scene: Scene,
    rng: np.random.Generator,
    *,
    size: tuple[int, int] | None = None,
    shape_fraction: float | None = None,
) -> tuple[Image.Image, RenderInfo]:
    """Render ``scene`` on a canvas of ``size`` (width, height; random if None); RGB, not yet encoded.

    ``shape_fraction``: the shape's size over the canvas' shorter side (random in 0.15-0.35 if None).
    """
    width, height = size if size is not None else sample_canvas(rng)
    background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3))
    base = np.array(COLORS[scene.color])
    fill = tuple(int(v) for v in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255))
    if shape_fraction is None:
        shape_fraction = rng.uniform(*SIZE_RANGE)
    elif not SIZE_RANGE[0] <= shape_fraction <= SIZE_RANGE[1]:
        raise ValueError(f"shape_fraction {shape_fraction} is outside {SIZE_RANGE}; pick a value inside it")
    side = shape_fraction * min(width, height)
    cx, cy = _center(scene.position, width, height, side, rng)
    noise_std = float(rng.uniform(0.0, NOISE_STD_MAX))

    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    h = side / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle pointing up, filling its bounding square's base and height
        draw.polygon([(cx - h, cy + h), (cx + h, cy + h), (cx, cy - h)], fill=fill)
    if noise_std > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr += rng.standard_normal(size=arr.shape, dtype=np.float32) * np.float32(noise_std)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    info = RenderInfo((width, height), (cx, cy), side, background, fill, noise_std)
    return img, info


def render(
    scene: Scene, rng: np.random.Generator, *, size: tuple[int, int] | None = None, shape_fraction: float | None = None
) -> Image.Image:
    """Render ``scene`` as an RGB image (random canvas when ``size`` is None); see the module docstring."""
    return render_with_info(scene, rng, size=size, shape_fraction=shape_fraction)[0]


def encode(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encode as JPEG (quality 60-95) or, with probability 0.3, PNG; returns (bytes, extension)."""
    buf = io.BytesIO()
    if rng.random() < PNG_PROBABILITY:
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), ".png"
    img.save(buf, format="JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    return buf.getvalue(), ".jpg"


def render_encoded(
    scene: Scene, rng: np.random.Generator, *, size: tuple[int, int] | None = None, shape_fraction: float | None = None
) -> Image.Image:
    """Render, encode and decode again: the picture a model would read from disk (RGB).

    PNG is lossless, so a PNG draw returns the render itself without spending time on zlib.
    """
    img = render(scene, rng, size=size, shape_fraction=shape_fraction)
    if rng.random() < PNG_PROBABILITY:
        return img
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return im.convert("RGB")


def write_folder(directory: str | Path, n: int, seed: int) -> list[tuple[Path, Scene]]:
    """Render ``n`` random scenes into ``directory`` (created if needed) as ``scene_00000.jpg``/``.png``.

    Deterministic for a seed. Returns (path, scene) for each file, in order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(n):
        scene = random_scene(rng)
        data, ext = encode(render(scene, rng), rng)
        path = directory / f"scene_{i:05d}{ext}"
        path.write_bytes(data)
        written.append((path, scene))
    return written
