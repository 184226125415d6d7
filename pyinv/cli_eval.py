"""``pyinv eval``: editing-quality benchmarks (``shapes``: ShapesBench on the demo model)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from .argtypes import positive_int
from .bench.shapes_bench import CONTROLS, EDIT_KINDS

EVAL_EPILOG = """\
Without --method and --control it runs every inversion method with P2P (prompt swap for
methods that take no attention control) and DDIM and Direct Inversion with MasaCtrl and PnP.
With --method and/or --control it runs each chosen method with each chosen control.

examples:
  pyinv eval shapes
  pyinv eval shapes --method direct --method ddim --control p2p --count 5
  pyinv eval shapes --json shapes.json --markdown shapes.md
"""


def add_eval_parser(sub, add_model_args) -> None:
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
    sh.add_argument("--control", action="append", choices=CONTROLS, help="attention control (repeatable)")
    sh.add_argument("--count", type=positive_int, default=10, metavar="N", help="cases per edit kind (default 10)")
    sh.add_argument("--kind", action="append", choices=EDIT_KINDS, help="edit kinds to run (default: all)")
    sh.add_argument("--steps", type=positive_int, metavar="N", help="inference steps (default: each method's)")
    sh.add_argument("--json", metavar="PATH", help="write settings, environment, summary and per-edit scores")
    sh.add_argument("--markdown", metavar="PATH", help="write the summary table as markdown")
    add_model_args(sh, "model preset or diffusers folder (default: demo)")
    sh.set_defaults(func=cmd_eval_shapes)


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from .bench import shapes_bench as sb
    from .bench.report import provenance, write_json, write_text
    from .cli import DEFAULT_MODEL, _distinct, _runtime, load_editor
    from .imageio import check_writable

    started = time.perf_counter()
    configs = sb.matrix(args.method, args.control)
    cases = sb.make_cases(args.count, args.kind or sb.EDIT_KINDS)
    outputs = [check_writable(p) for p in (args.json, args.markdown) if p]
    _distinct(outputs)
    device, dtype = _runtime(args)
    editor = load_editor(args.model or DEFAULT_MODEL, device, dtype, progress=False)
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
