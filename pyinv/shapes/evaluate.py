"""A rule-based reader of shapes-world images (no neural network).

From an RGB image it reads:

1. the background colour: the median of the border pixels, named by the nearest colour of
   :data:`~pyinv.shapes.world.COLORS`;
2. the shape mask: pixels farther than :data:`FOREGROUND_DISTANCE` (RGB, Euclidean; about
   half the distance of the two closest palette colours) from the background colour,
   keeping the largest 4-connected component;
3. the shape's colour: the median of the mask's pixels, named the same way;
4. its class from the fill ratio ``area / bounding-box area`` (square ≈ 1, circle ≈ π/4,
   triangle ≈ 1/2), and its centroid and size (``√area / side``).

It reads rendered images exactly; on model samples it tolerates noise and soft edges.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLORS

FOREGROUND_DISTANCE = 45.0
#: fill-ratio boundaries: below the first a triangle, below the second a circle, else a square
FILL_TRIANGLE_CIRCLE, FILL_CIRCLE_SQUARE = 0.64, 0.94
#: a shape smaller than this fraction of the image is "no shape"
MIN_AREA = 0.01

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float64)


@dataclass
class Reading:
    """What the evaluator read. ``shape`` and ``color`` are ``None`` when no shape was found.
    ``centroid = (y, x)`` and ``size`` are fractions of the image side."""

    background: str
    shape: str | None
    color: str | None
    mask: np.ndarray
    centroid: tuple[float, float] | None
    size: float
    fill: float

    def matches(self, shape: str, color: str, background: str) -> bool:
        return (self.shape, self.color, self.background) == (shape, color, background)


def nearest_color(rgb) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)
    return _NAMES[int(d.argmin())]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _median3(img: np.ndarray) -> np.ndarray:
    """3×3 median filter per channel (edges replicated): removes pixel noise, keeps edges."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    stack = np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return np.median(stack, axis=0)


def read(image: Image.Image | np.ndarray) -> Reading:
    """Read one image (see the module docstring)."""
    raw = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    img = _median3(raw)
    side_y, side_x = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    bg_ref = np.asarray(COLORS[background], dtype=np.float64)
    far = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    candidate = _largest_component(far)
    if candidate.sum() < MIN_AREA * side_y * side_x:
        return Reading(background, None, None, candidate, None, 0.0, 0.0)
    color = nearest_color(np.median(img[candidate], axis=0))
    # the shape is where a pixel is nearer the shape's colour than the background's
    fg_ref = np.asarray(COLORS[color], dtype=np.float64)
    nearer = ((raw - fg_ref) ** 2).sum(-1) < ((raw - bg_ref) ** 2).sum(-1)
    mask = _largest_component(nearer)
    area = int(mask.sum())
    if area < MIN_AREA * side_y * side_x:
        return Reading(background, None, None, mask, None, 0.0, 0.0)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = area / box
    shape = "triangle" if fill < FILL_TRIANGLE_CIRCLE else ("circle" if fill < FILL_CIRCLE_SQUARE else "square")
    centroid = (float((ys.mean() + 0.5) / side_y), float((xs.mean() + 0.5) / side_x))
    return Reading(background, shape, color, mask, centroid, float(np.sqrt(area) / side_y), float(fill))
