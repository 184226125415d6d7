"""``pyinv export``: build ahead of time the exported UNet graphs that edits will use.

A backend that exports (``onnxruntime``; any backend in :data:`pyinv.backends.BACKENDS`
built as ``Backend(cache=DIR)`` that lists what it exported in ``built``) makes one graph per
UNet call signature at the first call that needs it. This command makes those first calls:
for each layout it runs a short inversion of a synthetic image and an edit with the layout's
number of target prompts, on the chosen backend, so every graph the layout's calls meet is
exported into the cache (or found there), then prints what it built and what was already
cached. The graphs depend on the model, dtype, resolution and layout only, not on the
prompts' words or the number of steps, so later edits with those settings export nothing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PyinvError
from . import common
from .common import UsageError, runtime

#: the layouts built when none is given (see EXPORT_EPILOG for why)
DEFAULT_LAYOUTS = ("direct+p2p", "direct+masactrl", "ddim+pnp")
#: the backend used when none is given
DEFAULT_BACKEND = "onnxruntime"
#: most target prompts one layout may have (they run as one batch)
MAX_TARGETS = 100
#: the prompts of the warm-up edits (the graphs do not depend on their words)
SOURCE_PROMPT = "a photo of a cat"
TARGET_PROMPTS = ("a photo of a dog", "a photo of a fox", "a photo of a tiger", "a photo of a rabbit")

_LAYOUT = re.compile(r"^(?P<method>[a-z0-9_-]+)(?:\+(?P<control>[a-z0-9_-]+))?(?::(?P<targets>[0-9]+))?$")

EXPORT_EPILOG = """\
layouts (--layouts), METHOD[+CONTROL][:TARGETS]:
  METHOD   an inversion method: {methods}
  CONTROL  an attention control: {controls} (none, the default, is a prompt swap)
  TARGETS  target prompts edited in one batch (default 1; 'pyinv edit' with two --target is :2)
  e.g. direct+p2p, ddim+pnp, null-text+p2p, edit-friendly+p2p:2, direct (prompt swap).
  The defaults, {defaults}, are what 'pyinv edit' runs with its
  default method and --control p2p (its default) or masactrl, and Plug-and-Play on the DDIM
  inversion its paper uses. Layouts whose UNet batches have the same shapes share graphs.

Each layout runs a short inversion of a synthetic image and an edit on the backend, with the
methods' and controllers' default settings; every UNet graph those calls meet is exported
(one tick of the progress bar per layout). The graphs depend on the model, --dtype,
--resolution and the layout, not on the prompts' words or the number of steps; other
settings that change the batch or the control (LocalBlend's --blend-words, Direct
Inversion's --form offsets, guidance 1) need graphs of their own, exported at their first
call. The summary lists every graph: its signature (UNet batch rows R, latent size, the
control and its terms), whether it was built now or already cached, seconds and MiB.

The graphs go in --cache-dir, by default $PYINV_CACHE_DIR/exports when PYINV_CACHE_DIR is
set, else ~/.cache/pyinv/exports; 'pyinv edit --backend onnxruntime' reads the default one.
An entry made with other library versions, or damaged, is rebuilt in its place.

examples:
  pyinv export --model sd15-arch
  pyinv export --model sd15-arch --device cuda --dtype fp16 --layouts direct+p2p edit-friendly+p2p:2
  pyinv export --cache-dir /data/graphs --json export.json
  pyinv export --list
"""


@dataclass(frozen=True)
class Layout:
    """One layout: an inversion method (its registered name), a control name
    (:data:`pyinv.control.registry.CONTROL_NAMES`; ``"none"`` for the prompt swap) and the
    number of target prompts."""

    method: str
    control: str
    targets: int = 1

    @property
    def label(self) -> str:
        text = self.method if self.control == "none" else f"{self.method}+{self.control}"
        return text if self.targets == 1 else f"{text}:{self.targets}"


def parse_layout(text: str) -> Layout:
    """``METHOD[+CONTROL][:TARGETS]`` as a :class:`Layout`; an argparse type (its errors are
    one-line usage errors)."""
    from ..control.registry import NONE, get_control
    from ..inversion import get_method

    given = str(text).strip()
    match = _LAYOUT.match(given.lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"layout {text!r} is not METHOD[+CONTROL][:TARGETS] (e.g. direct+p2p, edit-friendly+p2p:2)"
        )
    try:
        method = get_method(match["method"])
        control = get_control(match["control"] or NONE).name
    except PyinvError as exc:
        raise argparse.ArgumentTypeError(f"layout {text!r}: {exc}") from None
    if control != NONE and not method.takes_control:
        raise argparse.ArgumentTypeError(
            f"layout {text!r}: {method.name} runs its own coupled loop and takes no attention control"
            f" (use {method.name!r} alone)"
        )
    targets = int(match["targets"]) if match["targets"] is not None else 1
    if not 1 <= targets <= MAX_TARGETS:
        raise argparse.ArgumentTypeError(f"layout {text!r}: TARGETS must be 1 … {MAX_TARGETS}, got {targets}")
    return Layout(method.name, control, targets)


def exporting_backends() -> list[str]:
    """The backends of :data:`pyinv.backends.BACKENDS` that export graphs into a cache: those
    built as ``Backend(cache=...)``."""
    from ..backends import BACKENDS

    names = []
    for name, cls in BACKENDS.items():
        try:
            parameters = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            continue
        if "cache" in parameters:
            names.append(name)
    return names


def backend_arg(text: str) -> str:
    """``--backend``: a backend that exports (an argparse type)."""
    from ..backends import BACKENDS

    name = str(text).strip().lower()
    usable = exporting_backends()
    if name not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; use one of {', '.join(usable)}")
    if name not in usable:
        raise argparse.ArgumentTypeError(
            f"backend {name!r} exports no graphs to build ahead of time; use one of {', '.join(usable)}"
        )
    return name


def add_parser(sub) -> None:
    """Register ``pyinv export`` on the top-level subparsers ``sub``."""
    from ..argtypes import int_in
    from ..control.registry import choices
    from ..inversion import METHODS

    p = sub.add_parser(
        "export",
        help="build ahead of time the exported UNet graphs edits will use (onnxruntime backend)",
        description="Export the UNet graphs that edits with the given layouts will use into the "
        "export cache, so that later edits on the backend start at once; then list each graph, "
        "whether it was built or already cached, its build time and size.",
        epilog=EXPORT_EPILOG.format(
            methods=", ".join(METHODS), controls=choices(), defaults=", ".join(DEFAULT_LAYOUTS)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--layouts",
        nargs="+",
        type=parse_layout,
        metavar="L",
        help=f"METHOD[+CONTROL][:TARGETS] layouts to build (default: {' '.join(DEFAULT_LAYOUTS)})",
    )
    p.add_argument(
        "--resolution",
        type=int_in(8, 4096),
        metavar="PX",
        help="image side in pixels, a multiple of the model's latent factor times its UNet's "
        "downsampling (default: the model's)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the graphs go (default: $PYINV_CACHE_DIR/exports, else ~/.cache/pyinv/exports)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.add_argument(
        "--list", action="store_true", help="list the entries of the cache with their sizes, and build nothing"
    )
    g = p.add_argument_group("model and runtime")
    g.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help=f"model preset, diffusers folder or hub id (default: {common.DEFAULT_MODEL})",
    )
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", help="fp32 or fp16 (default: fp32); graphs are made per dtype")
    g.add_argument(
        "--backend",
        type=backend_arg,
        metavar="NAME",
        help=f"the backend whose graphs to build: {', '.join(exporting_backends())} (default: {DEFAULT_BACKEND})",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------- building
def size_factor(model) -> tuple[int, int, int]:
    """``(factor, pixels per latent pixel, UNet downsampling)``: image sides must be a
    multiple of ``factor`` for the UNet's levels to tile the latents exactly."""
    down = 2 ** max(len(getattr(model.unet.config, "block_out_channels", (0,))) - 1, 0)
    return model.scale_factor * down, model.scale_factor, down


def _first_edit_step(algo, steps: int, family: str = "SD") -> int:
    """The first sampling step an edit of a ``steps``-step inversion runs with the method's
    default options on a ``family`` model (EF-DDPM skips some)."""
    if "skip" not in algo.edit_options:
        return 0
    skip = algo.edit_options["skip"]
    if skip is None:
        from ..inversion.edit_friendly import default_skip

        return default_skip(steps, family)
    return int(skip)


def _fits(algo, control: str, steps: int, family: str = "SD") -> bool:
    """Whether a ``steps``-step inversion and its edit meet the graphs an edit with the
    method's default step count meets: every term of the controller active somewhere."""
    from ..control import P2P, MasaCtrl
    from ..control.words import check_window

    calls = steps - _first_edit_step(algo, steps, family)
    if calls < 1:
        return False
    if control == "masactrl":  # controlled from call start_step on (default 4)
        return calls > MasaCtrl().start_step
    if control == "p2p":  # self-attention replaced in calls int(s·N) ≤ k < int(e·N): none, no self layers
        _, own = P2P().windows(algo.control_defaults.get("p2p", {}))
        start, end = check_window(own, "self_replace")
        return int(steps * start) < int(steps * end)
    return True  # pnp applies every term at every step of a graph-static plan; none has none


def steps_for(algo, control: str, family: str = "SD") -> int:
    """The fewest inference steps (at least 2) that make a layout's edit on a ``family``
    model meet all its graphs."""
    most = algo.steps_for(family)
    for steps in range(2, most + 1):
        if _fits(algo, control, steps, family):
            return steps
    return most


def _cheap_invert_options(algo) -> dict[str, Any]:
    """Inversion options that only make the warm-up faster (NTI's and PTI's optimisation runs
    eager, outside the graphs): one inner step."""
    return {"inner_steps": 1} if "inner_steps" in algo.invert_options else {}


def gradient_image(size: int):
    """A smooth synthetic RGB image, ``size`` pixels square."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.9 - 0.6 * xx * yy], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def run_layout(editor, layout: Layout) -> int:
    """Invert the synthetic image and edit it as ``layout`` on the editor's backend (the
    graphs are exported or loaded by the calls); returns the steps used."""
    from ..control.registry import build_controller
    from ..inversion import get_method

    algo = get_method(layout.method)
    steps = steps_for(algo, layout.control, editor.model.family)
    control = build_controller(layout.control)
    targets = [TARGET_PROMPTS[k % len(TARGET_PROMPTS)] for k in range(layout.targets)]
    if control is not None:
        control.check_prompts(editor.model, SOURCE_PROMPT, targets, steps)
    image = gradient_image(editor.model.image_size)
    inv = editor.invert(image, SOURCE_PROMPT, method=algo.name, steps=steps, seed=0, **_cheap_invert_options(algo))
    editor.edit_latents(inv, targets, control=control, seed=0)
    return steps


@dataclass
class GraphRow:
    """One graph in the summary."""

    layout: str
    signature: str
    digest: str
    status: str  # "built" or "cached"
    seconds: float | None
    size_bytes: int
    path: str

    @property
    def mib(self) -> float:
        return self.size_bytes / 2**20


def _rows(layout: Layout, entries, status: str) -> list[GraphRow]:
    rows = []
    for signature, entry in entries:
        try:
            size = entry.size_bytes
        except OSError:  # removed meanwhile by another process
            size = 0
        seconds = round(entry.seconds, 3) if status == "built" else None
        rows.append(
            GraphRow(layout.label, signature.describe(), signature.digest(), status, seconds, size, str(entry.path))
        )
    return rows


def _unique(layouts: list[Layout]) -> list[Layout]:
    seen: list[Layout] = []
    for layout in layouts:
        if layout not in seen:
            seen.append(layout)
    return seen


def cmd_export(args: argparse.Namespace) -> int:
    """``pyinv export``: export the graphs of the layouts, then print the summary."""
    from ..backends import BACKENDS

    if args.list:
        return _list_cache(args)
    started = time.perf_counter()
    layouts = _unique(args.layouts or [parse_layout(text) for text in DEFAULT_LAYOUTS])
    device, dtype = runtime(args)
    report = None
    if args.json:
        from ..imageio import check_writable

        report = check_writable(args.json)
    name = args.backend or DEFAULT_BACKEND
    backend = BACKENDS[name](cache=args.cache_dir)
    backend.check(device, dtype)
    editor = common.load_editor(args.model or common.DEFAULT_MODEL, device, dtype, progress=False, backend=backend)
    model = editor.model
    if args.resolution is not None:
        factor, per_latent, down = size_factor(model)
        if args.resolution % factor:
            raise UsageError(
                f"--resolution {args.resolution} is not a multiple of {factor} for model {model.name!r} "
                f"({per_latent} pixels per latent pixel × {down} for the UNet's downsampling)"
            )
        model.image_size = args.resolution
    cache = getattr(backend, "cache", None)
    removed = cache.clean_partial() if hasattr(cache, "clean_partial") else 0
    rows, runs = _build(editor, backend, layouts, quiet=args.quiet)
    seconds = time.perf_counter() - started
    summary = _summary(args, name, model, device, cache, rows, runs, seconds, removed)
    if report is not None:
        from ..reports import write_json

        write_json(report, summary)
    if not args.quiet:
        print("\n".join(_table(summary)))
    return 0


def _build(editor, backend, layouts: list[Layout], quiet: bool) -> tuple[list[GraphRow], list[dict[str, Any]]]:
    """Run every layout on the backend; the graphs each one met first, and each run."""
    from tqdm.auto import tqdm

    built, found = backend.built, getattr(backend, "found", [])
    rows: list[GraphRow] = []
    runs: list[dict[str, Any]] = []
    with tqdm(total=len(layouts), desc="pyinv export", unit="layout", disable=quiet, file=sys.stderr) as bar:
        for layout in layouts:
            bar.set_postfix_str(layout.label)
            n_built, n_found = len(built), len(found)
            start = time.perf_counter()
            steps = run_layout(editor, layout)
            new = _rows(layout, built[n_built:], "built") + _rows(layout, found[n_found:], "cached")
            rows += new
            runs.append(
                {
                    "layout": layout.label,
                    "method": layout.method,
                    "control": layout.control,
                    "targets": layout.targets,
                    "steps": steps,
                    "seconds": round(time.perf_counter() - start, 3),
                    "new_graphs": [row.digest for row in new],
                }
            )
            bar.update(1)
    return rows, runs


def _summary(args, backend_name, model, device, cache, rows, runs, seconds, removed) -> dict[str, Any]:
    from .. import __version__

    size = sum(row.size_bytes for row in rows)
    return {
        "command": "export",
        "pyinv": __version__,
        "model": model.name,
        "backend": backend_name,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "resolution": model.image_size,
        "cache": str(cache.root) if hasattr(cache, "root") else None,
        "partial_removed": removed,
        "layouts": runs,
        "graphs": [{**vars(row), "size_mib": round(row.mib, 3)} for row in rows],
        "totals": {
            "graphs": len(rows),
            "built": sum(row.status == "built" for row in rows),
            "cached": sum(row.status == "cached" for row in rows),
            "build_seconds": round(sum(row.seconds or 0.0 for row in rows), 3),
            "seconds": round(seconds, 3),
            "size_bytes": size,
            "size_mib": round(size / 2**20, 3),
        },
    }


def _table(summary: dict[str, Any]) -> list[str]:
    """The summary as text: a header, one line per graph, the totals."""
    lines = [
        f"pyinv export: model {summary['model']}, {summary['backend']}, {summary['device']} {summary['dtype']}, "
        f"{summary['resolution']}² pixels, cache {summary['cache']}"
    ]
    graphs, totals = summary["graphs"], summary["totals"]
    layout_w = max([len("layout"), len("total")] + [len(r["layout"]) for r in summary["layouts"]])
    sig_w = max([len("graph")] + [len(g["signature"]) for g in graphs])
    lines.append(f"{'layout':<{layout_w}}  {'graph':<{sig_w}}  {'status':<6}  {'seconds':>8}  {'MiB':>9}")
    for run in summary["layouts"]:
        mine = [g for g in graphs if g["layout"] == run["layout"]]
        if not mine:
            lines.append(f"{run['layout']:<{layout_w}}  (no graph of its own: it uses graphs listed above)")
        for g in mine:
            secs = "-" if g["seconds"] is None else f"{g['seconds']:.1f}"
            graph = f"{g['signature']:<{sig_w}}  {g['status']:<6}  {secs:>8}  {g['size_mib']:>9.1f}"
            lines.append(f"{run['layout']:<{layout_w}}  {graph}")
    counts = f"{totals['graphs']} graphs: {totals['built']} built, {totals['cached']} already cached"
    lines.append(
        f"{'total':<{layout_w}}  {counts}; {totals['size_mib']:.1f} MiB; "
        f"{totals['build_seconds']:.1f} s exporting, {totals['seconds']:.1f} s in all"
    )
    if summary["partial_removed"]:
        lines.append(f"removed {summary['partial_removed']} partial entries left by interrupted exports")
    return lines


# ---------------------------------------------------------------------- listing
def _list_cache(args: argparse.Namespace) -> int:
    """``pyinv export --list``: the cache's entries, what each is for and its size."""
    from ..backends.cache import ExportCache

    cache = ExportCache(args.cache_dir)
    entries = [_describe_entry(path) for path in cache.entries()]
    size = sum(e["size_bytes"] for e in entries)
    payload = {"cache": str(cache.root), "entries": entries, "size_bytes": size, "size_mib": round(size / 2**20, 3)}
    if args.json:
        from ..reports import write_json

        write_json(args.json, payload)
    if args.quiet:
        return 0
    print(f"pyinv export: cache {cache.root}: {len(entries)} entries, {size / 2**20:.1f} MiB")
    if entries:
        model_w = max(len("model"), *(len(e["model"]) for e in entries))
        sig_w = max(len("graph"), *(len(e["signature"]) for e in entries))
        print(f"{'entry':<12}  {'model':<{model_w}}  {'dtype':<8}  {'graph':<{sig_w}}  {'MiB':>9}")
        for e in entries:
            print(
                f"{e['slot'][:12]:<12}  {e['model']:<{model_w}}  {e['dtype']:<8}  {e['signature']:<{sig_w}}  "
                f"{e['size_bytes'] / 2**20:>9.1f}"
            )
    return 0


def _describe_entry(path: Path) -> dict[str, Any]:
    """One entry's slot, model, dtype, graph signature and size, from its meta file (entries
    whose meta cannot be read are listed as such: the next build of their slot replaces them)."""
    from ..backends.flat import GraphSignature

    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != "meta.json")
    info: dict[str, Any] = {"slot": path.name, "path": str(path), "size_bytes": size}
    try:
        what = json.loads((path / "meta.json").read_text(encoding="utf-8"))["what"]
        info.update(
            kind=str(what.get("kind", "?")),
            model=str(what["model"]["fingerprint"]["name"]),
            dtype=str(what.get("dtype", "?")),
            signature=GraphSignature.from_doc(what["graph"]).describe(),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        info.update(kind="?", model="?", dtype="?", signature="(unreadable meta file)")
    return info
