"""PIE-Bench (PnP Inversion, arXiv 2310.01506): read the data set, run the edits, score them, summarise.

Data (``DIR``): ``DIR/mapping_file.json`` maps 12-digit ids to entries with ``image_path``
(relative to ``DIR/annotation_images``, or to ``DIR``), ``original_prompt`` and
``editing_prompt`` (changed words in ``[…]``, stripped before use), ``editing_type_id``
(``"0"``–``"9"``, :data:`EDITING_TYPES`), ``blended_word`` (``"source_word target_word"``,
may be empty) and ``mask``: run-length pairs over the row-major ``512×512`` edit mask
(:func:`decode_mask`).

Run: each image is inverted once per method (with its source prompt) and edited towards
the target prompt with each controller — P2P in PIE-Bench's settings on the blended words
(:meth:`pyinv.P2P.pie_bench`), MasaCtrl and PnP at their reference defaults, or a plain
prompt swap. Edits are written atomically to ``OUT/<method>+<control>/<folder of
image_path>/<id>.png`` (PIE-Bench names each image after its id); an edit whose file exists
is not redone (the run resumes), its metrics are computed from the file.

Scoring (:mod:`pyinv.bench.pie_metrics`) is at the mask's ``512×512``, as the reference:
the source is centre-cropped and resized to 512 (a no-op for PIE-Bench's images) and an
edit of another size — a model that samples smaller images — is resized to 512 (bicubic),
so its background scores also count the model's lower resolution.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

from ..errors import PyinvError
from ..imageio import atomic_path, center_crop_resize, load_image, save_image
from .pie_metrics import PieMetrics
from .report import markdown_table, text_table
from .shapes_bench import BenchConfig, _mean, by_config
from .shapes_bench import matrix as shapes_matrix

MAPPING_FILE = "mapping_file.json"
IMAGES_FOLDER = "annotation_images"
#: side of PIE-Bench's images and masks; edits are scored at this size
SIDE = 512
EDITING_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change content",
    "5": "change pose",
    "6": "change colour",
    "7": "change material",
    "8": "change background",
    "9": "change style",
}
REQUIRED = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")


# ---------------------------------------------------------------------- data
def decode_mask(rle: Sequence[int], shape: tuple[int, int] = (SIDE, SIDE)) -> np.ndarray:
    """The ``(H, W)`` bool edit mask (True = region to edit) of PIE-Bench's run-length code.

    ``rle = [s₀, n₀, s₁, n₁, …]`` sets the flat row-major pixels ``s_k … s_k + n_k − 1``
    (runs are cut at the end of the image); then, as the reference does "to avoid
    annotation errors in the boundary", the one-pixel border is set too.
    """
    if len(rle) % 2:
        raise PyinvError(f"a run-length mask needs [start, length] pairs; got {len(rle)} numbers")
    if any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0 for v in rle):
        raise PyinvError("a run-length mask must hold non-negative integers")
    h, w = shape
    flat = np.zeros(h * w, dtype=bool)
    for start, length in zip(rle[0::2], rle[1::2], strict=True):
        flat[start : start + length] = True
    mask = flat.reshape(h, w)
    mask[0, :] = mask[-1, :] = True
    mask[:, 0] = mask[:, -1] = True
    return mask


def strip_brackets(prompt: str) -> str:
    """A PIE-Bench prompt without the ``[`` ``]`` that mark the changed words."""
    return prompt.replace("[", "").replace("]", "")


@dataclass(frozen=True)
class PieCase:
    """One PIE-Bench entry (prompts already stripped of brackets)."""

    id: str
    image_path: str
    file: str
    source_prompt: str
    target_prompt: str
    editing_type: str
    instruction: str
    words: tuple[str, str] | None
    mask_rle: tuple[int, ...]

    def mask(self) -> np.ndarray:
        """``(512, 512)`` bool, True = region to edit."""
        return decode_mask(self.mask_rle)


def _entry(key: str, item, data_dir: str) -> PieCase:
    where = f"{MAPPING_FILE} entry {key!r}"
    if not key or key in (".", "..") or any(c in key for c in "/\\\0"):
        raise PyinvError(f"{where}: an id must be usable as a file name")
    if not isinstance(item, dict):
        raise PyinvError(f"{where} is not an object")
    for name in REQUIRED:
        if name not in item:
            raise PyinvError(f"{where} has no {name!r}")
    for name in ("image_path", "original_prompt", "editing_prompt"):
        if not isinstance(item[name], str):
            raise PyinvError(f"{where}: {name!r} must be a string")
    kind = str(item["editing_type_id"])
    if kind not in EDITING_TYPES:
        raise PyinvError(f"{where}: editing_type_id must be one of 0-9, got {item['editing_type_id']!r}")
    mask = item["mask"]
    if not isinstance(mask, list) or len(mask) % 2 or not all(isinstance(v, int) and v >= 0 for v in mask):
        raise PyinvError(f"{where}: 'mask' must be a list of [start, length] pairs of non-negative integers")
    rel = item["image_path"]
    parts = rel.replace("\\", "/").split("/")
    if not rel or os.path.isabs(rel) or ".." in parts:
        raise PyinvError(f"{where}: image_path must be a relative path inside the data folder, got {rel!r}")
    blended = str(item.get("blended_word") or "").split()
    return PieCase(
        id=str(key),
        image_path=rel,
        file=_image_file(data_dir, rel),
        source_prompt=strip_brackets(item["original_prompt"]),
        target_prompt=strip_brackets(item["editing_prompt"]),
        editing_type=kind,
        instruction=str(item.get("editing_instruction") or ""),
        words=(blended[0], blended[1]) if len(blended) >= 2 else None,
        mask_rle=tuple(mask),
    )


def _image_file(data_dir: str, rel: str) -> str:
    """``DIR/annotation_images/rel`` (PIE-Bench's layout) when it exists, else ``DIR/rel``."""
    nested = os.path.join(data_dir, IMAGES_FOLDER, rel)
    return nested if os.path.isfile(nested) else os.path.join(data_dir, rel)


def load_cases(data_dir: str, types: Sequence[str] | None = None, limit: int | None = None) -> list[PieCase]:
    """The entries of ``data_dir/mapping_file.json`` of the chosen editing ``types`` (all by
    default), the first ``limit`` of them in the file's order; one clear error for a missing
    or malformed mapping file or missing images."""
    if not os.path.isdir(data_dir):
        raise PyinvError(f"PIE-Bench folder not found: {data_dir}")
    path = os.path.join(data_dir, MAPPING_FILE)
    if not os.path.isfile(path):
        raise PyinvError(f"no {MAPPING_FILE} in {data_dir} (expected PIE-Bench's {MAPPING_FILE} and {IMAGES_FOLDER}/)")
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except json.JSONDecodeError as exc:
        raise PyinvError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise PyinvError(f"{path} is not a UTF-8 text file") from None
    if not isinstance(mapping, dict) or not mapping:
        raise PyinvError(f"{path} must be a non-empty object mapping image ids to entries")
    for t in types or ():
        if t not in EDITING_TYPES:
            raise PyinvError(f"unknown editing type {t!r}; use 0-9")
    cases = []
    for key, item in mapping.items():
        case = _entry(key, item, data_dir)
        if types and case.editing_type not in types:
            continue
        cases.append(case)
        if limit is not None and len(cases) >= limit:
            break
    if not cases:
        raise PyinvError(f"no entries of editing type(s) {', '.join(types or ())} in {path}")
    missing = [c for c in cases if not os.path.isfile(c.file)]
    if missing:
        c = missing[0]
        raise PyinvError(
            f"{len(missing)} of {len(cases)} images not found, e.g. entry {c.id!r}: looked for "
            f"{os.path.join(data_dir, IMAGES_FOLDER, c.image_path)} and {c.file}"
        )
    return cases


# ---------------------------------------------------------------------- configurations
def matrix(methods: Sequence[str] | None = None, controls: Sequence[str] | None = None) -> list[BenchConfig]:
    """Direct Inversion + P2P (the benchmark's headline) when nothing is chosen, else every
    chosen method with every chosen control (P2P, or a prompt swap for methods without control)."""
    if not methods and not controls:
        return [BenchConfig("direct", "p2p")]
    return shapes_matrix(methods, controls)


def controller_for(control: str, case: PieCase):
    """The controller of ``control`` for ``case`` in the benchmarks' settings: P2P in
    PIE-Bench's settings on the blended words (refine with its windows only where an entry
    has none), MasaCtrl and PnP at their defaults, ``None`` for a prompt swap."""
    from ..control.registry import benchmark_controller

    return benchmark_controller(control, case.words)


def output_path(out_dir: str, config: BenchConfig, case: PieCase) -> str:
    """``out_dir/<method>+<control>/<folder of image_path>/<id>.png`` (one file per entry,
    even where two entries share an image)."""
    folder = os.path.dirname(case.image_path)
    return os.path.join(out_dir, f"{config.method}+{config.control}", folder, case.id + ".png")


# ---------------------------------------------------------------------- running
@dataclass
class PieResult:
    """One edit's scores in raw units (``nan`` = undefined, ``None`` = metric unavailable).

    ``seconds`` is inversion + edit wall time (``nan`` for an edit read back from an earlier
    run: ``resumed``); ``error`` says why an edit failed (its metrics are then ``nan``).
    """

    id: str
    image: str
    editing_type: str
    method: str
    control: str
    structure: float | None = math.nan
    psnr: float | None = math.nan
    lpips: float | None = math.nan
    mse: float | None = math.nan
    ssim: float | None = math.nan
    clip_whole: float | None = math.nan
    clip_edited: float | None = math.nan
    seconds: float = math.nan
    edit_side: int = 0
    resumed: bool = False
    error: str = ""


def scoring_pair(source: Image.Image, edit: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Source and edit as uint8 ``(512, 512, 3)`` (centre-cropped, resized bicubically where needed)."""
    return (
        np.asarray(center_crop_resize(source.convert("RGB"), SIDE)),
        np.asarray(center_crop_resize(edit.convert("RGB"), SIDE)),
    )


def _read_done(path: str) -> Image.Image | None:
    """An edit written by an earlier run, or None (missing or unreadable: redo it)."""
    if not os.path.isfile(path):
        return None
    try:
        return load_image(path)
    except PyinvError:
        return None


def _result(case: PieCase, cfg: BenchConfig, **values) -> PieResult:
    return PieResult(case.id, case.image_path, case.editing_type, cfg.method, cfg.control, **values)


def _score(metrics: PieMetrics, case: PieCase, source: Image.Image, mask: np.ndarray, edit: Image.Image) -> dict:
    src, out = scoring_pair(source, edit)
    return {**metrics.score(src, out, mask, case.target_prompt), "edit_side": edit.size[0]}


def _edit_case(
    editor, case: PieCase, source: Image.Image, method: str, todo: list, steps: int | None, seed: int
) -> list[tuple[BenchConfig, str, Image.Image | None, float, str]]:
    """Invert ``case`` once with ``method`` and edit it for every ``(config, path)`` of ``todo``;
    returns ``(config, path, image or None, seconds, error)`` per config."""
    from ..inversion import get_method

    n = steps or get_method(method).steps_for(editor.model)
    done, ready = [], []
    for cfg, path in todo:
        try:
            control = controller_for(cfg.control, case)
            if control is not None:
                control.check_prompts(editor.model, case.source_prompt, [case.target_prompt], n)
            ready.append((cfg, path))
        except PyinvError as exc:
            done.append((cfg, path, None, math.nan, str(exc)))
    if not ready:
        return done
    try:
        started = time.perf_counter()
        inv = editor.invert(source, case.source_prompt, method=method, steps=steps, seed=seed)
        invert_seconds = time.perf_counter() - started
    except PyinvError as exc:
        return done + [(cfg, path, None, math.nan, str(exc)) for cfg, path in ready]
    for cfg, path in ready:
        try:
            started = time.perf_counter()
            out = editor.edit(inv, case.target_prompt, control=controller_for(cfg.control, case), seed=seed)
            seconds = invert_seconds + time.perf_counter() - started
        except PyinvError as exc:
            done.append((cfg, path, None, math.nan, str(exc)))
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_image(out.images[0], path)
        done.append((cfg, path, out.images[0], seconds, ""))
    return done


def run_pie_bench(
    cases: Sequence[PieCase],
    configs: Sequence[BenchConfig],
    metrics: PieMetrics,
    out_dir: str,
    editor_factory: Callable[[], object],
    steps: int | None = None,
    seed: int = 0,
    rerun: bool = False,
    progress: bool = True,
) -> list[PieResult]:
    """Edit and score every case with every configuration (see the module docstring).

    ``editor_factory()`` makes the :class:`~pyinv.Editor`; it is called once, when the first
    edit is needed (a run whose edits all exist never loads the diffusion model). With
    ``rerun`` existing edits are redone. A case that cannot be edited (a damaged image, a
    blended word not in its prompt, …) gets a result with ``error`` and ``nan`` metrics.
    """
    from tqdm.auto import tqdm

    from ..inversion import get_method

    by_method: dict[str, list[BenchConfig]] = {}
    for cfg in configs:
        by_method.setdefault(get_method(cfg.method).name, []).append(cfg)
    editor = None
    results: list[PieResult] = []
    bar = tqdm(total=len(cases) * len(configs), desc="PIE-Bench", unit="edit", disable=not progress)
    try:
        for case in cases:
            try:
                source = load_image(case.file)
                mask = case.mask()
            except PyinvError as exc:
                results += [_result(case, cfg, error=str(exc)) for cfg in configs]
                bar.update(len(configs))
                continue
            for method, method_configs in by_method.items():
                todo = []
                for cfg in method_configs:
                    path = output_path(out_dir, cfg, case)
                    edited = None if rerun else _read_done(path)
                    if edited is None:
                        todo.append((cfg, path))
                        continue
                    results.append(_result(case, cfg, resumed=True, **_score(metrics, case, source, mask, edited)))
                    bar.update(1)
                if not todo:
                    continue
                if editor is None:
                    editor = editor_factory()
                for cfg, _path, image, seconds, error in _edit_case(editor, case, source, method, todo, steps, seed):
                    scores = _score(metrics, case, source, mask, image) if image is not None else {}
                    results.append(_result(case, cfg, seconds=seconds, error=error, **scores))
                    bar.update(1)
    finally:
        bar.close()
    return results


# ---------------------------------------------------------------------- summary
#: summary columns: (title, PieSummary field, scale applied to the raw mean)
SCALED = (
    ("struct×1e3", "structure", 1e3),
    ("PSNR", "psnr", 1.0),
    ("LPIPS×1e3", "lpips", 1e3),
    ("MSE×1e4", "mse", 1e4),
    ("SSIM×1e2", "ssim", 1e2),
    ("CLIP whole", "clip_whole", 1.0),
    ("CLIP edited", "clip_edited", 1.0),
)


@dataclass
class PieSummary:
    """Means over one configuration's edits of one editing type (``"all"``: every type), in
    the reference's units: structure ×10³, PSNR (dB), LPIPS ×10³, MSE ×10⁴, SSIM ×10², CLIP
    ×1 (already 100·cos); ``seconds`` is the median over this run's edits. Means are over
    finite values (failed edits and undefined metrics left out); ``None`` = unavailable."""

    method: str
    control: str
    editing_type: str
    images: int
    failed: int
    structure: float | None
    psnr: float | None
    lpips: float | None
    mse: float | None
    ssim: float | None
    clip_whole: float | None
    clip_edited: float | None
    seconds: float


def _summary(method: str, control: str, kind: str, rs: list[PieResult]) -> PieSummary:
    means: dict[str, float | None] = {}
    for _, key, scale in SCALED:
        values = [getattr(r, key) for r in rs if not r.error]
        if values and all(v is None for v in values):
            means[key] = None
        else:
            means[key] = _mean([v for v in values if v is not None]) * scale
    timed = [r.seconds for r in rs if math.isfinite(r.seconds)]
    return PieSummary(
        method=method,
        control=control,
        editing_type=kind,
        images=len(rs),
        failed=sum(bool(r.error) for r in rs),
        seconds=float(np.median(timed)) if timed else math.nan,
        **means,  # type: ignore[arg-type]
    )


def summarize(results: Sequence[PieResult]) -> list[PieSummary]:
    """Per configuration (in order of appearance): one row per editing type present, then ``"all"``."""
    rows = []
    for (method, control), rs in by_config(results).items():
        for kind in sorted({r.editing_type for r in rs}, key=int):
            rows.append(_summary(method, control, kind, [r for r in rs if r.editing_type == kind]))
        rows.append(_summary(method, control, "all", rs))
    return rows


def type_label(kind: str) -> str:
    return kind if kind == "all" else f"{kind} {EDITING_TYPES[kind]}"


HEAD = ("method", "control", "editing type", "images", "failed") + tuple(t for t, _, _ in SCALED) + ("s/edit",)


def _cells(row: PieSummary) -> list[str]:
    def num(value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}" if math.isfinite(value) else "–"

    cells = [row.method, row.control, type_label(row.editing_type), str(row.images), str(row.failed)]
    return cells + [num(getattr(row, key)) for _, key, _ in SCALED] + [num(row.seconds)]


def table_lines(rows: Sequence[PieSummary]) -> list[str]:
    """A fixed-width text table of the summary."""
    return text_table([list(HEAD)] + [_cells(r) for r in rows], left=3)


def markdown_lines(rows: Sequence[PieSummary], notes: Sequence[str] = ()) -> list[str]:
    """The summary as a markdown table, followed by the notes."""
    out = markdown_table([list(HEAD)] + [_cells(r) for r in rows], left=3)
    return out + ([""] + [f"- {n}" for n in notes] if notes else [])


def notes(results: Sequence[PieResult], unavailable: dict[str, str]) -> list[str]:
    """Why metrics show ``n/a``, how many edits failed (the first reason) and any resizing."""
    out = []
    by_reason: dict[str, list[str]] = {}
    for metric, reason in unavailable.items():
        by_reason.setdefault(reason, []).append(metric)
    for reason, names in by_reason.items():
        out.append(f"n/a: {', '.join(names)} unavailable: {reason}")
    failed = [r for r in results if r.error]
    if failed:
        out.append(
            f"{len(failed)} edit(s) failed, e.g. {failed[0].id} ({failed[0].method}+{failed[0].control}): "
            f"{failed[0].error}"
        )
    sides = sorted({r.edit_side for r in results if r.edit_side and r.edit_side != SIDE})
    if sides:
        out.append(f"edits of {', '.join(f'{s}×{s}' for s in sides)} px were resized to {SIDE}×{SIDE} for scoring")
    if any(r.resumed for r in results):
        out.append(f"{sum(r.resumed for r in results)} edit(s) were read back from an earlier run (no time measured)")
    return out


CSV_COLUMNS = tuple(f.name for f in fields(PieResult))


def _csv_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def write_csv(path: str, results: Sequence[PieResult]) -> None:
    """Per-edit scores in raw units (``n/a`` = metric unavailable, ``nan`` = undefined), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            row = asdict(r)
            writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
