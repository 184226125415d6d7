"""ShapesBench: a PIE-Bench-like editing benchmark on the shapes world, scored without networks.

Cases (:func:`make_cases`) are generated deterministically from seeds. Each is a *real*
image — a render of a scene from the generator (:mod:`pyinv.shapes.world`), not a model
sample — with a source prompt (its caption), a target prompt that changes one attribute,
and an edit mask (the pixels the edit may change):

- ``color``: the shape's colour (``"a red circle …"`` → ``"a green circle …"``); mask: the shape;
- ``shape``: its class, same centre and size (circle → square); mask: old ∪ new shape;
- ``background``: the background colour; mask: everything but the shape.

Each case is inverted with the source prompt and edited towards the target prompt.
Metrics, in PIE-Bench's spirit (its background metrics come from :mod:`pyinv.bench.metrics`):

- background preservation outside the edit mask: PSNR (dB), MSE ×10⁴, SSIM ×10², against
  the source image;
- structure: IoU of the shape mask the evaluator reads from the edit with the target
  scene's mask, and the shift of its centroid (pixels);
- edit success: the rule-based evaluator (:func:`pyinv.shapes.evaluate.read`) reads the
  target's shape, colour and background;
- time per edit: inversion + edit wall time (what one edit of a new image costs).

Controllers per case: P2P in PIE-Bench's configuration (:meth:`pyinv.P2P.pie_bench` on the
changed words), MasaCtrl and PnP at their defaults, as ``pyinv edit`` runs them. (On the demo
model PnP's default keeps the method's unconditional embedding: the reference's negative
prompt, "ugly, blurry, black, low res, unrealistic", is words the model was never trained
on, see :meth:`pyinv.PnP.resolved_negative_prompt`.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import PyinvError
from ..shapes.evaluate import read
from ..shapes.world import COLORS, SHAPES, Scene, render, sample_scene, shape_mask
from .metrics import masked_mse, masked_psnr, masked_ssim, to_unit_tensor
from .report import markdown_table, text_table

EDIT_KINDS = ("color", "shape", "background")
#: scene seeds of the benchmark (training uses seeds from 10⁹, the quality check 7·10⁶)
BENCH_SEED_BASE = 5_000_000


@dataclass(frozen=True)
class EditCase:
    """One benchmark edit: a source scene and the target scene it should become."""

    id: str
    kind: str
    source: Scene
    target: Scene

    @property
    def source_prompt(self) -> str:
        return self.source.caption

    @property
    def target_prompt(self) -> str:
        return self.target.caption

    @property
    def words(self) -> tuple[str, str]:
        """The changed word in the source and target prompts."""
        return getattr(self.source, self.kind), getattr(self.target, self.kind)

    def image(self, side: int = 32) -> Image.Image:
        return render(self.source, side)

    def edit_mask(self, side: int = 32) -> np.ndarray:
        """``(side, side)`` bool: the pixels this edit may change."""
        before, after = shape_mask(self.source, side), shape_mask(self.target, side)
        if self.kind == "background":
            return ~(before & after)
        return before | after


def _edited_scene(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    if kind == "shape":
        return scene.with_(shape=str(rng.choice([s for s in SHAPES if s != scene.shape])))
    taken = {scene.color, scene.background}
    new = str(rng.choice([c for c in COLORS if c not in taken]))
    return scene.with_(color=new) if kind == "color" else scene.with_(background=new)


def make_cases(
    per_kind: int = 20, kinds: Sequence[str] = EDIT_KINDS, seed_base: int = BENCH_SEED_BASE
) -> list[EditCase]:
    """``per_kind`` cases of each kind, interleaved (color, shape, background, color, …)."""
    unknown = set(kinds) - set(EDIT_KINDS)
    if unknown:
        raise PyinvError(f"unknown edit kind(s) {', '.join(sorted(unknown))}; use {', '.join(EDIT_KINDS)}")
    cases = []
    for k in range(per_kind):
        for j, kind in enumerate(EDIT_KINDS):
            if kind not in kinds:
                continue
            seed = seed_base + len(EDIT_KINDS) * k + j
            scene = sample_scene(seed)
            target = _edited_scene(scene, kind, np.random.default_rng([seed, 1]))
            cases.append(EditCase(f"{kind}-{k:03d}", kind, scene, target))
    return cases


# ---------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class BenchConfig:
    """An inversion method and an attention controller (``"none"`` = prompt swap)."""

    method: str
    control: str

    @property
    def label(self) -> str:
        return f"{self.method} + {self.control}"


def default_matrix() -> list[BenchConfig]:
    """Every inversion method with P2P (prompt swap where a method takes no control), and
    DDIM and Direct Inversion with MasaCtrl and PnP."""
    from ..control.registry import DEFAULT_CONTROL, NONE
    from ..inversion import METHODS

    configs = [BenchConfig(m.name, DEFAULT_CONTROL if m.takes_control else NONE) for m in METHODS.values()]
    configs += [BenchConfig(m, c) for m in ("ddim", "direct") for c in ("masactrl", "pnp")]
    return configs


def matrix(methods: Sequence[str] | None = None, controls: Sequence[str] | None = None) -> list[BenchConfig]:
    """The configurations to run: the default matrix when nothing is chosen, else every
    chosen method with every chosen control (P2P when no control is chosen)."""
    from ..control.registry import DEFAULT_CONTROL, NONE, get_control
    from ..inversion import METHODS, get_method

    if not methods and not controls:
        return default_matrix()
    for c in controls or ():
        get_control(c)  # an unknown name is an error listing the choices
    algos = [get_method(m) for m in methods] if methods else list(METHODS.values())
    configs = []
    for algo in algos:
        chosen = list(controls) if controls else [DEFAULT_CONTROL if algo.takes_control else NONE]
        for c in chosen:
            if c != NONE and not algo.takes_control:
                if controls and methods:
                    raise PyinvError(f"method {algo.name!r} takes no attention control; use --control none")
                continue
            configs.append(BenchConfig(algo.name, c))
    return list(dict.fromkeys(configs))


def controller_for(control: str, case: EditCase | None):
    """The controller of ``control`` for ``case`` in the benchmarks' settings (P2P in
    PIE-Bench's configuration on the changed words; ``None`` for prompt swap)."""
    from ..control.registry import benchmark_controller

    return benchmark_controller(control, None if case is None else case.words)


# ---------------------------------------------------------------------- scoring
@dataclass
class CaseResult:
    """One edit's scores (``nan`` where undefined, e.g. no shape found)."""

    case: str
    kind: str
    method: str
    control: str
    success: bool
    psnr: float
    mse: float
    ssim: float
    iou: float
    centroid_shift: float
    seconds: float
    read_as: str = ""


def score(case: EditCase, edited: Image.Image | np.ndarray) -> dict[str, float | bool | str]:
    """Metrics of one edited image (PIL or uint8 ``(H, W, 3)``; see the module docstring)."""
    if isinstance(edited, np.ndarray):
        edited = Image.fromarray(edited)
    side = edited.size[0]
    source = to_unit_tensor(case.image(side))
    result = to_unit_tensor(edited)
    keep = torch.from_numpy(~case.edit_mask(side)).float()[None]
    got = read(edited)
    want = shape_mask(case.target, side)
    union = (got.mask | want).sum()
    iou = float((got.mask & want).sum() / union) if union else 0.0
    shift = math.nan
    if got.centroid is not None:
        ys, xs = np.nonzero(want)
        want_c = ((ys.mean() + 0.5) / side, (xs.mean() + 0.5) / side)
        shift = float(math.hypot(got.centroid[0] - want_c[0], got.centroid[1] - want_c[1]) * side)
    t = case.target
    return {
        "success": got.matches(t.shape, t.color, t.background),
        "psnr": float(masked_psnr(result, source, keep)[0]),
        "mse": float(masked_mse(result, source, keep)[0]),
        "ssim": float(masked_ssim(result, source, keep)[0]),
        "iou": iou,
        "centroid_shift": shift,
        "read_as": f"{got.color} {got.shape} on {got.background}",
    }


def run_bench(
    editor,
    cases: Sequence[EditCase],
    configs: Sequence[BenchConfig],
    steps: int | None = None,
    progress: bool = True,
    on_edit=None,
) -> list[CaseResult]:
    """Invert every case once per method and edit it with every controller of that method.

    ``on_edit(case, config, image)`` (optional) sees every edited image.
    """
    from tqdm.auto import tqdm

    from ..inversion import get_method

    by_method: dict[str, list[BenchConfig]] = {}
    for cfg in configs:
        by_method.setdefault(get_method(cfg.method).name, []).append(cfg)
    results = []
    bar = tqdm(total=len(cases) * len(configs), desc="ShapesBench", unit="edit", disable=not progress)
    try:
        for case in cases:
            image = case.image(editor.model.image_size)
            for method, method_configs in by_method.items():
                started = time.perf_counter()
                inv = editor.invert(image, case.source_prompt, method=method, steps=steps, seed=0)
                invert_seconds = time.perf_counter() - started
                for cfg in method_configs:
                    started = time.perf_counter()
                    out = editor.edit(inv, case.target_prompt, control=controller_for(cfg.control, case), seed=0)
                    seconds = invert_seconds + time.perf_counter() - started
                    edited = out.images[0]
                    if on_edit is not None:
                        on_edit(case, cfg, edited)
                    results.append(
                        CaseResult(case.id, case.kind, cfg.method, cfg.control, seconds=seconds, **score(case, edited))
                    )
                    bar.update(1)
    finally:
        bar.close()
    return results


# ---------------------------------------------------------------------- summary
@dataclass
class SummaryRow:
    """Means over the cases of one configuration (success and IoU over all cases; the
    centroid shift over the edits where a shape was found; PSNR over finite values)."""

    method: str
    control: str
    cases: int
    success: float
    success_by_kind: dict[str, float] = field(default_factory=dict)
    psnr: float = math.nan
    mse_e4: float = math.nan
    ssim_e2: float = math.nan
    iou: float = math.nan
    centroid_shift: float = math.nan
    seconds: float = math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def by_config(results: Sequence) -> dict[tuple[str, str], list]:
    """Results grouped by ``(method, control)``, in the order the pairs first appear."""
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        groups.setdefault((r.method, r.control), []).append(r)
    return groups


def summarize(results: Sequence[CaseResult]) -> list[SummaryRow]:
    """One row per (method, control), in the order they first appear."""
    rows = []
    for (method, control), rs in by_config(results).items():
        kinds = {k: [r for r in rs if r.kind == k] for k in EDIT_KINDS}
        rows.append(
            SummaryRow(
                method=method,
                control=control,
                cases=len(rs),
                success=float(np.mean([r.success for r in rs])),
                success_by_kind={k: float(np.mean([r.success for r in v])) for k, v in kinds.items() if v},
                psnr=_mean([r.psnr for r in rs]),
                mse_e4=_mean([r.mse for r in rs]) * 1e4,
                ssim_e2=_mean([r.ssim for r in rs]) * 1e2,
                iou=_mean([r.iou for r in rs]),
                centroid_shift=_mean([r.centroid_shift for r in rs]),
                seconds=float(np.median([r.seconds for r in rs])),
            )
        )
    return rows


COLUMNS = (
    ("method", "method"),
    ("control", "control"),
    ("success %", "success"),
    ("color %", "color"),
    ("shape %", "shape"),
    ("bg %", "background"),
    ("bg PSNR", "psnr"),
    ("bg MSE×1e4", "mse_e4"),
    ("bg SSIM×1e2", "ssim_e2"),
    ("IoU", "iou"),
    ("shift px", "centroid_shift"),
    ("s/edit", "seconds"),
)


def _cell(row: SummaryRow, key: str) -> str:
    if key in ("method", "control"):
        return getattr(row, key)
    if key == "success":
        return f"{100 * row.success:.0f}"
    if key in EDIT_KINDS:
        value = row.success_by_kind.get(key)
        return "–" if value is None else f"{100 * value:.0f}"
    value = getattr(row, key)
    if not math.isfinite(value):
        return "–"
    digits = {"psnr": 1, "mse_e4": 1, "ssim_e2": 1, "iou": 2, "centroid_shift": 2, "seconds": 2}[key]
    return f"{value:.{digits}f}"


def _cells(rows: Sequence[SummaryRow]) -> list[list[str]]:
    return [[title for title, _ in COLUMNS]] + [[_cell(r, key) for _, key in COLUMNS] for r in rows]


def table_lines(rows: Sequence[SummaryRow]) -> list[str]:
    """A fixed-width text table of the summary."""
    return text_table(_cells(rows), left=2)


def markdown_lines(rows: Sequence[SummaryRow]) -> list[str]:
    """The summary as a markdown table."""
    return markdown_table(_cells(rows), left=2)
