"""Draw the example image shipped with pyinv: a shapes-world scene the demo model knows.

python examples/make_example.py examples/red-circle.png

The scene is "a red circle on a blue background", drawn exactly at the demo model's
32×32 resolution (see pyinv.shapes.world).
"""

import sys

from pyinv.shapes import Scene, render

EXAMPLE = Scene("circle", "red", "blue", center=(0.5, 0.5), size=0.25)

if __name__ == "__main__":
    render(EXAMPLE, 32).save(sys.argv[1] if len(sys.argv) > 1 else "red-circle.png")
