"""``pyinv eval``: editing-quality benchmarks (``shapes``: ShapesBench on the demo model;
``pie-bench``: PIE-Bench on a real checkpoint)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from ..argtypes import int_in, positive_int
from ..bench.pie_metrics import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_LPIPS, LPIPS_NETS, OFF
from ..bench.shapes_bench import EDIT_KINDS
from ..control.registry import CONTROL_NAMES
from . import common
from .common import add_model_args, distinct, quiet_libraries, runtime

EVAL_EPILOG = """\
Without --method and --control it runs every inversion method with P2P (prompt swap for
methods that take no attention control) and DDIM and Direct Inversion with MasaCtrl and PnP.
With --method and/or --control it runs each chosen method with each chosen control.

examples:
  pyinv eval shapes
  pyinv eval shapes --method direct --method ddim --control p2p --count 5
  pyinv eval shapes --json shapes.json --markdown shapes.md
"""


def add_eval_parser(sub) -> None:
    """Register ``pyinv eval`` and its benchmarks on the top-level subparsers ``sub``."""
    ev = sub.add_parser("eval", help="measure editing quality on a benchmark", description="Measure editing quality.")
    benches = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    sh = benches.add_parser(
        "shapes",
        help="ShapesBench: colour, shape and background edits of shapes-world images",
        description="ShapesBench: invert generated shapes-world images and edit one attribute; "
        "score background preservation, structure and edit success with the rule-based evaluator.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sh.add_argument("--method", action="append", metavar="NAME", help="inversion method (repeatable)")
    sh.add_argument("--control", action="append", choices=CONTROL_NAMES, help="attention control (repeatable)")
    sh.add_argument(
        "--count", type=int_in(1, 1000), default=10, metavar="N", help="cases per edit kind, at most 1000 (default 10)"
    )
    sh.add_argument("--kind", action="append", choices=EDIT_KINDS, help="edit kinds to run (default: all)")
    sh.add_argument("--steps", type=positive_int, metavar="N", help="inference steps (default: each method's)")
    sh.add_argument("--json", metavar="PATH", help="write settings, environment, summary and per-edit scores")
    sh.add_argument("--markdown", metavar="PATH", help="write the summary table as markdown")
    add_model_args(sh, "model preset or diffusers folder (default: demo)")
    sh.set_defaults(func=cmd_eval_shapes)
    _add_pie_parser(benches)


PIE_EPILOG = f"""\
DIR holds PIE-Bench as distributed: DIR/mapping_file.json and the images under
DIR/annotation_images/ (or under DIR itself). Without --method and --control it runs
Direct Inversion + P2P (PIE-Bench's P2P settings on each entry's blended words); with them
each chosen method with each chosen control. Edits are written to
OUT/<method>+<control>/<folder of the image>/<id>.png; an edit whose file exists is not
redone (the run resumes after an interruption; --rerun redoes them) and is scored from
the file. Per-edit scores go to OUT/scores.csv (or --csv), in raw units.

Metrics (at 512x512, as the reference evaluation): structure distance (DINO keys, x1e3),
PSNR, LPIPS (x1e3), MSE (x1e4) and SSIM (x1e2) outside the edit mask, CLIP similarity of
the whole edit and of the edited part with the target prompt. Metric models load from a
local folder or a hub id; one that cannot be loaded (or is given as '{OFF}') makes its
metric n/a, with the reason below the table. LPIPS needs torchvision.

examples:
  pyinv eval pie-bench --data PIE-Bench --model CompVis/stable-diffusion-v1-4 --device cuda
  pyinv eval pie-bench --data PIE-Bench --model ./sd15 --method ddim --method direct \\
      --control p2p --type 1 --type 6 --limit 20 --json pie.json --markdown pie.md
  pyinv eval pie-bench --data PIE-Bench --model ./sd15 --dino ./dino-vitb8 --clip ./clip-vit-l14
"""


def _add_pie_parser(benches) -> None:
    from ..bench.pie_bench import EDITING_TYPES

    pie = benches.add_parser(
        "pie-bench",
        help="PIE-Bench: 700 real images, 10 editing types, the reference's seven metrics",
        description="PIE-Bench (PnP Inversion): invert each image, edit it towards its target prompt and "
        "score structure, background preservation and CLIP similarity as the reference evaluation does.",
        epilog=PIE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pie.add_argument("--data", required=True, metavar="DIR", help="PIE-Bench folder (with mapping_file.json)")
    pie.add_argument("--method", action="append", metavar="NAME", help="inversion method (repeatable)")
    pie.add_argument("--control", action="append", choices=CONTROL_NAMES, help="attention control (repeatable)")
    pie.add_argument(
        "--out",
        default="pie-bench-output",
        metavar="DIR",
        help="folder of the edited images (default pie-bench-output)",
    )
    pie.add_argument("--rerun", action="store_true", help="redo edits whose files already exist")
    pie.add_argument(
        "--type",
        action="append",
        choices=list(EDITING_TYPES),
        metavar="ID",
        help="editing type 0-9 (repeatable; default all): " + ", ".join(f"{k} {v}" for k, v in EDITING_TYPES.items()),
    )
    pie.add_argument("--limit", type=positive_int, metavar="N", help="only the first N entries (after --type)")
    pie.add_argument("--steps", type=positive_int, metavar="N", help="inference steps (default: each method's)")
    g = pie.add_argument_group("metric models")
    g.add_argument(
        "--dino",
        default=DEFAULT_DINO,
        metavar="PATH_OR_HUB_ID",
        help=f"DINO ViT for structure (default {DEFAULT_DINO})",
    )
    g.add_argument(
        "--clip", default=DEFAULT_CLIP, metavar="PATH_OR_HUB_ID", help=f"CLIP model (default {DEFAULT_CLIP})"
    )
    g.add_argument(
        "--lpips",
        default=DEFAULT_LPIPS,
        choices=[*LPIPS_NETS, OFF],
        help=f"LPIPS network (default {DEFAULT_LPIPS}; needs torchvision)",
    )
    r = pie.add_argument_group("reports")
    r.add_argument("--csv", metavar="PATH", help="per-edit scores (default OUT/scores.csv)")
    r.add_argument("--json", metavar="PATH", help="write settings, environment, summary and per-edit scores")
    r.add_argument("--markdown", metavar="PATH", help="write the summary table as markdown")
    add_model_args(pie, "model preset, diffusers folder or hub id (default: demo; PIE-Bench's numbers are for SD 1.x)")
    pie.set_defaults(func=cmd_eval_pie_bench)


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from ..bench import shapes_bench as sb
    from ..imageio import check_writable
    from ..provenance import provenance
    from ..reports import write_json, write_text

    started = time.perf_counter()
    configs = sb.matrix(args.method, args.control)
    cases = sb.make_cases(args.count, args.kind or sb.EDIT_KINDS)
    outputs = [check_writable(p) for p in (args.json, args.markdown) if p]
    distinct(outputs)
    device, dtype = runtime(args)
    editor = common.load_editor(
        args.model or common.DEFAULT_MODEL,
        device,
        dtype,
        progress=False,
        backend=getattr(args, "backend", None),
        vae=getattr(args, "vae", None),
    )
    results = sb.run_bench(editor, cases, configs, steps=args.steps, progress=not args.quiet)
    rows = sb.summarize(results)
    print("\n".join(sb.table_lines(rows)))
    settings = {
        "model": editor.model.name,
        "dtype": str(dtype).replace("torch.", ""),
        "cases_per_kind": args.count,
        "kinds": list(args.kind or sb.EDIT_KINDS),
        "steps": args.steps,
        "configs": [c.label for c in configs],
    }
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "shapes",
                "settings": settings,
                **provenance(device),
                "summary": [asdict(r) for r in rows],
                "edits": [asdict(r) for r in results],
            },
        )
    if args.markdown:
        write_text(args.markdown, sb.markdown_lines(rows))
    if not args.quiet:
        print(
            f"pyinv: eval shapes: {len(results)} edits of {len(cases)} cases in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    return 0


def _output_folder(path: str) -> str:
    import os

    from ..errors import PyinvError

    if os.path.exists(path) and not os.path.isdir(path):
        raise PyinvError(f"--out is a file, not a folder: {path}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise PyinvError(f"cannot create the output folder {path}: {exc.strerror or exc}") from None
    return path


def cmd_eval_pie_bench(args: argparse.Namespace) -> int:
    import os

    from ..bench import pie_bench as pb
    from ..bench.pie_metrics import PieMetrics
    from ..imageio import check_writable
    from ..provenance import provenance
    from ..reports import write_json, write_text

    started = time.perf_counter()
    configs = pb.matrix(args.method, args.control)
    cases = pb.load_cases(args.data, args.type, args.limit)
    out_dir = _output_folder(args.out)
    csv_path = args.csv or os.path.join(out_dir, "scores.csv")
    reports = [check_writable(p) for p in (csv_path, args.json, args.markdown) if p]
    distinct(reports)
    device, dtype = runtime(args)
    with quiet_libraries():
        metrics = PieMetrics.load(args.dino, args.clip, args.lpips, device)
    model = args.model or common.DEFAULT_MODEL
    results = pb.run_pie_bench(
        cases,
        configs,
        metrics,
        out_dir,
        lambda: common.load_editor(
            model, device, dtype, progress=False, backend=getattr(args, "backend", None), vae=getattr(args, "vae", None)
        ),
        steps=args.steps,
        seed=0 if args.seed is None else args.seed,
        rerun=args.rerun,
        progress=not args.quiet,
    )
    rows = pb.summarize(results)
    notes = pb.notes(results, metrics.unavailable)
    print("\n".join(pb.table_lines(rows) + notes))
    pb.write_csv(csv_path, results)
    if args.json:
        settings = {
            "model": model,
            "dtype": str(dtype).replace("torch.", ""),
            "data": os.path.abspath(args.data),
            "images": len(cases),
            "types": list(args.type or pb.EDITING_TYPES),
            "limit": args.limit,
            "steps": args.steps,
            "configs": [c.label for c in configs],
            "metric_models": {"dino": args.dino, "clip": args.clip, "lpips": args.lpips},
            "scoring_side": pb.SIDE,
        }
        write_json(
            args.json,
            {
                "benchmark": "pie-bench",
                "settings": settings,
                **provenance(device),
                "unavailable": metrics.unavailable,
                "notes": notes,
                "summary": [asdict(r) for r in rows],
                "edits": [asdict(r) for r in results],
            },
        )
    if args.markdown:
        write_text(args.markdown, pb.markdown_lines(rows, notes))
    if not args.quiet:
        print(
            f"pyinv: eval pie-bench: {len(results)} edits of {len(cases)} images in "
            f"{time.perf_counter() - started:.0f} s; per-edit scores in {csv_path}",
            file=sys.stderr,
        )
    return 0
