"""Draw the example image shipped with pyinv: a shaded red ball on a blue background.

python examples/make_example.py examples/red-ball.png
"""

import sys

import numpy as np
from PIL import Image


def red_ball(size: int = 256) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    sky = np.stack([0.25 + 0.2 * yy, 0.45 + 0.2 * yy, 0.85 - 0.1 * yy], axis=-1)
    r2 = (xx - 0.5) ** 2 + (yy - 0.55) ** 2
    ball = r2 < 0.09
    light = np.clip(1.0 - 2.5 * ((xx - 0.42) ** 2 + (yy - 0.45) ** 2), 0.25, 1.0)
    img = sky.copy()
    img[ball] = np.stack([0.9 * light, 0.12 * light, 0.1 * light], axis=-1)[ball]
    shadow = ((xx - 0.5) ** 2 / 0.09 + (yy - 0.88) ** 2 / 0.002) < 1
    img[shadow & ~ball] *= 0.6
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


if __name__ == "__main__":
    red_ball().save(sys.argv[1] if len(sys.argv) > 1 else "red-ball.png")
