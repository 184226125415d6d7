"""How well a model draws the shapes world: sample held-out prompts, read them back.

    python -m pyinv.shapes.quality --model demo --count 200 --grid samples.png

Prompts are the captions of scenes drawn with seeds from :data:`QUALITY_SEED_BASE` on
(training uses seeds from 10⁹, the tests small seeds), each sampled from the noise seed
of the same number. A sample counts as correct when the rule-based evaluator
(:func:`pyinv.shapes.evaluate.read`) reads the prompted shape, shape colour and background
colour. Reports overall accuracy and accuracy per attribute.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

from PIL import Image

from .evaluate import read
from .world import sample_scene

#: scene and noise seeds of the quality check
QUALITY_SEED_BASE = 7_000_000


@dataclass
class QualityReport:
    """Accuracy of ``count`` samples (fractions in [0, 1]) and the most common misreadings."""

    model: str
    count: int
    steps: int
    guidance: float
    accuracy: float
    shape_accuracy: float
    color_accuracy: float
    background_accuracy: float
    mistakes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"{self.model}: {self.count} samples, {self.steps} steps, guidance {self.guidance:g}",
            f"  all attributes right: {self.accuracy:.1%}",
            f"  shape {self.shape_accuracy:.1%}, colour {self.color_accuracy:.1%}, "
            f"background {self.background_accuracy:.1%}",
            *(["  most common mistakes: " + "; ".join(self.mistakes)] if self.mistakes else []),
        ]


def quality_prompts(count: int, start: int = QUALITY_SEED_BASE) -> tuple[list[str], list[int]]:
    """The held-out captions and their noise seeds."""
    seeds = list(range(start, start + count))
    return [sample_scene(s).caption for s in seeds], seeds


def check_quality(
    editor, count: int = 200, steps: int = 50, guidance: float = 7.5, batch: int = 50, progress: bool = False
) -> tuple[QualityReport, list[Image.Image]]:
    """Sample ``count`` held-out prompts with ``editor``'s model and read every sample."""
    from tqdm.auto import tqdm

    prompts, seeds = quality_prompts(count)
    images: list[Image.Image] = []
    for lo in tqdm(range(0, count, batch), desc="samples", disable=not progress, unit="batch"):
        images += editor.generate(prompts[lo : lo + batch], seeds[lo : lo + batch], steps=steps, guidance=guidance)
    right = Counter()
    mistakes = Counter()
    for seed, image in zip(seeds, images, strict=True):
        scene, got = sample_scene(seed), read(image)
        checks = {
            "shape": got.shape == scene.shape,
            "color": got.color == scene.color,
            "background": got.background == scene.background,
        }
        right.update(k for k, ok in checks.items() if ok)
        right["all"] += all(checks.values())
        if not checks["shape"]:
            mistakes[f"{scene.shape} read as {got.shape}"] += 1
        if not checks["color"]:
            mistakes[f"{scene.color} shape read as {got.color}"] += 1
        if not checks["background"]:
            mistakes[f"{scene.background} background read as {got.background}"] += 1
    report = QualityReport(
        model=editor.model.name,
        count=count,
        steps=steps,
        guidance=guidance,
        accuracy=right["all"] / count,
        shape_accuracy=right["shape"] / count,
        color_accuracy=right["color"] / count,
        background_accuracy=right["background"] / count,
        mistakes=[f"{what} ({n})" for what, n in mistakes.most_common(5)],
    )
    return report, images


def image_grid(images: list[Image.Image], columns: int, scale: int = 2, gap: int = 2) -> Image.Image:
    """Images (all the same size) tiled in rows of ``columns``, enlarged ``scale``× (nearest)."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w * scale + gap) + gap, rows * (h * scale + gap) + gap), (128, 128, 128))
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        sheet.paste(
            img.resize((w * scale, h * scale), Image.NEAREST),
            (gap + c * (w * scale + gap), gap + r * (h * scale + gap)),
        )
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyinv.shapes.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="model preset or diffusers folder (default: demo)")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device")
    p.add_argument("--grid", metavar="PNG", help="also write the samples as a grid image")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = p.parse_args(argv)
    from ..api import Editor
    from ..errors import PyinvError

    try:
        editor = Editor.from_pretrained(args.model, device=args.device)
    except PyinvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report, images = check_quality(editor, args.count, args.steps, args.guidance, args.batch, progress=True)
    print("\n".join(report.lines()))
    if args.grid:
        image_grid(images, columns=20).save(args.grid)
    if args.json:
        from ..provenance import provenance
        from ..reports import write_json

        settings = {"model": args.model, "count": args.count, "steps": args.steps, "guidance": args.guidance}
        settings["schedule"] = "reference"
        payload = {"benchmark": "demo-quality", "settings": settings, **provenance(editor.model.device)}
        write_json(args.json, {**payload, **asdict(report)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
