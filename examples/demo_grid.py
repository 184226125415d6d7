"""Draw the README's before/after grid: shapes-world images edited with the demo model.

    python examples/demo_grid.py --out docs/demo-edits.png

Each row is one real image (a render from the shapes world, not a model sample) and one
edit; each column an inversion method + attention control. Every edit is inverted and
edited with the method's reference settings (50 steps, guidance 7.5); P2P runs in PIE-Bench's
configuration on the changed word (see pyinv.bench.shapes_bench).
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

import pyinv
from pyinv.bench.shapes_bench import BenchConfig, EditCase, controller_for
from pyinv.shapes import Scene, render


def _case(name: str, kind: str, source: Scene, **change) -> EditCase:
    """An edit of ``source`` that changes the attributes in ``change``."""
    return EditCase(name, kind, source, source.with_(**change))


CASES = [
    _case("color", "color", Scene("circle", "red", "blue", (0.5, 0.5), 0.25), color="green"),
    _case("shape", "shape", Scene("square", "yellow", "purple", (0.45, 0.55), 0.22), shape="triangle"),
    _case("background", "background", Scene("triangle", "white", "black", (0.55, 0.4), 0.24), background="orange"),
    _case("color2", "color", Scene("square", "orange", "green", (0.4, 0.45), 0.2), color="purple"),
]
CONFIGS = [
    BenchConfig("ddim", "none"),
    BenchConfig("ddim", "p2p"),
    BenchConfig("null-text", "p2p"),
    BenchConfig("direct", "p2p"),
    BenchConfig("edit-friendly", "p2p"),
    BenchConfig("direct", "masactrl"),
    BenchConfig("direct", "pnp"),
    BenchConfig("edict", "none"),
]
SCALE = 4
LABEL_H = 14


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/demo-edits.png")
    p.add_argument("--model", default="demo")
    args = p.parse_args()
    editor = pyinv.Editor.from_pretrained(args.model)
    side = editor.model.image_size * SCALE
    columns = ["source", "target (ideal)"] + [c.label.replace(" + none", "") for c in CONFIGS]
    sheet = Image.new("RGB", (len(columns) * (side + 4) + 4, LABEL_H + len(CASES) * (side + LABEL_H + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(columns):
        draw.text((4 + j * (side + 4), 2), title, fill="black")
    for i, case in enumerate(CASES):
        y = LABEL_H + i * (side + LABEL_H + 4)
        draw.text((4, y), f"{case.source_prompt}  ->  {case.target_prompt}", fill="black")
        image = case.image(editor.model.image_size)
        cells = [image, render(case.target, editor.model.image_size)]
        inversions = {}
        for cfg in CONFIGS:
            if cfg.method not in inversions:
                inversions[cfg.method] = editor.invert(image, case.source_prompt, method=cfg.method, seed=0)
            out = editor.edit(
                inversions[cfg.method], case.target_prompt, control=controller_for(cfg.control, case), seed=0
            )
            cells.append(out.images[0])
            print(f"{case.id}: {cfg.label} done", flush=True)
        for j, cell in enumerate(cells):
            sheet.paste(cell.resize((side, side), Image.NEAREST), (4 + j * (side + 4), y + LABEL_H))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
