"""The shapes world: deterministic images of one coloured shape on a plain background.

Every image is drawn from a :class:`Scene` — shape (circle, square, triangle), its colour,
the background colour (one of :data:`COLORS`, never the shape's), centre and size — and
has the caption ``"a red circle on a blue background"``. Drawing is exact (no
anti-aliasing): a pixel belongs to the shape when its centre lies inside it, so the shape
mask is known and the evaluator (:mod:`pyinv.shapes.evaluate`) can read images back exactly.

Sizes and positions are fractions of the image side, so the same scene can be drawn at
any resolution. :func:`sample_scene` draws a scene from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

#: colour name → RGB (well separated, so a noisy sample still reads as its colour)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 130, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
#: half-size of the shape as a fraction of the image side
SIZE_RANGE = (0.16, 0.3)
#: the shape stays this far (fraction of the side) from the border
MARGIN = 0.04


@dataclass(frozen=True)
class Scene:
    """One image of the world. ``center = (y, x)`` and ``size`` (half the shape's extent)
    are fractions of the image side."""

    shape: str
    color: str
    background: str
    center: tuple[float, float] = (0.5, 0.5)
    size: float = 0.25

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {', '.join(SHAPES)}")
        for what in ("color", "background"):
            if getattr(self, what) not in COLORS:
                raise ValueError(f"unknown {what} {getattr(self, what)!r}; use one of {', '.join(COLORS)}")
        if self.color == self.background:
            raise ValueError("the shape and the background must have different colours")

    @property
    def caption(self) -> str:
        return caption(self.shape, self.color, self.background)

    def with_(self, **changes) -> Scene:
        """The same scene with some attributes changed (an edit's target scene)."""
        return replace(self, **changes)


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def sample_scene(seed: int) -> Scene:
    """A scene drawn from ``seed`` (uniform shape and colours, size and position)."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    background = [c for c in names if c != color][rng.integers(len(names) - 1)]
    size = float(rng.uniform(*SIZE_RANGE))
    low, high = size + MARGIN, 1.0 - size - MARGIN
    center = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
    return Scene(shape, color, background, center, size)


def shape_mask(scene: Scene, side: int) -> np.ndarray:
    """``(side, side)`` bool: pixels whose centre is inside the shape.

    circle: ``|p − c| ≤ s``; square: ``|p − c|∞ ≤ s``; triangle: apex up, base ``2s``
    wide at ``c_y + s``, apex at ``c_y − s``.
    """
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side
    cy, cx = scene.center
    s = scene.size
    dy, dx = yy - cy, xx - cx
    if scene.shape == "circle":
        return dy**2 + dx**2 <= s**2
    if scene.shape == "square":
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    # triangle: half-width grows linearly from 0 at the apex to s at the base
    t = (dy + s) / (2 * s)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= s * t)


def render(scene: Scene, side: int = 32) -> Image.Image:
    """The scene as an RGB image ``side × side``."""
    img = np.empty((side, side, 3), dtype=np.uint8)
    img[...] = COLORS[scene.background]
    img[shape_mask(scene, side)] = COLORS[scene.color]
    return Image.fromarray(img)
