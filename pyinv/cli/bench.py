"""``pyinv benchmark``: latency reports of method × control × backend × dtype against the
NTI + P2P baseline (see :mod:`pyinv.bench.speed`)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from ..argtypes import int_in, positive_int
from ..bench.speed import BACKENDS, DTYPE_NAMES
from ..control.registry import CONTROL_NAMES
from . import common
from .common import EXIT_INTERRUPTED, distinct, quiet_libraries

BENCH_EPILOG = """\
Each configuration runs --warmup + --repeats times on the same image and prompts; the table
gives the median time of each stage (encode, invert, edit, decode), end to end (e2e) and
re-edit from a cached inversion (edit + decode), the UNet image-forwards, ms per forward,
peak memory, the PSNR of the method's reconstruction and the speedup over the baseline
(NTI + P2P: fp32, eager, 10 inner steps with early stop), measured in the same run.
Ctrl-C stops the run and still writes the reports of the configurations measured so far.

examples:
  pyinv benchmark --quick
  pyinv benchmark --method direct --method ddim --control p2p --control masactrl
  pyinv benchmark --model sd15-arch --device cuda --dtype fp16 --backend eager --backend compile \\
      --json bench.json --markdown bench.md --plot bench.png
"""


def add_benchmark_parser(sub) -> None:
    """Register ``pyinv benchmark`` on the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "benchmark",
        help="time inversion + editing configurations against the NTI + P2P baseline",
        description="Time inversion + editing configurations (method × control × backend × dtype) "
        "stage by stage, against the NTI + P2P baseline measured in the same run.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="NAME_OR_PATH", help="model preset, diffusers folder or hub id (default: demo)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--method", action="append", metavar="NAME", help="inversion method (repeatable)")
    p.add_argument(
        "--control", action="append", choices=CONTROL_NAMES, help="attention control (repeatable; default p2p)"
    )
    p.add_argument("--backend", action="append", choices=BACKENDS, help="UNet backend (repeatable; default eager)")
    p.add_argument(
        "--dtype", action="append", choices=DTYPE_NAMES, help="dtype (repeatable; default fp32 on cpu, fp16 on cuda)"
    )
    p.add_argument(
        "--resolution", type=int_in(8, 4096), metavar="PX", help="image side, 8 … 4096 (default: the model's)"
    )
    p.add_argument("--steps", type=positive_int, metavar="N", help="inference steps (default: each method's)")
    p.add_argument(
        "--warmup", type=int_in(0, 100), default=None, metavar="N", help="untimed runs per configuration (default 1)"
    )
    p.add_argument("--repeats", type=int_in(1, 100), default=None, metavar="N", help="timed runs (default 3)")
    p.add_argument("--no-baseline", action="store_true", help="skip the NTI + P2P baseline (no speedup column)")
    p.add_argument(
        "--quick", action="store_true", help="a small run: direct and ddim with P2P + the baseline, 1 + 2 runs"
    )
    p.add_argument("--json", metavar="PATH", help="write settings, environment and every measurement")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of end-to-end time per configuration")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..bench import speed
    from ..bench.speed_report import markdown_lines, plot, table_lines, target_lines
    from ..errors import PyinvError
    from ..imageio import check_writable
    from ..models import parse_device, parse_dtype
    from ..provenance import provenance
    from ..reports import write_json, write_text

    started = time.perf_counter()
    if args.warmup is not None and args.warmup < 0:
        raise PyinvError(f"--warmup must be 0 or more, got {args.warmup}")
    outputs = [check_writable(p) for p in (args.json, args.markdown, args.plot) if p]
    distinct(outputs)
    device = parse_device(args.device)
    dtypes = args.dtype or (["fp16"] if device.type == "cuda" else ["fp32"])
    configs = speed.matrix(
        args.method, args.control, args.backend or ["eager"], dtypes, baseline=not args.no_baseline, quick=args.quick
    )
    name = args.model or common.DEFAULT_MODEL
    editors: dict[tuple[str, str], object] = {}

    def load(dtype: str, backend: str):
        """One model per dtype, one compiled wrapper per (dtype, backend); cached."""
        if (dtype, "eager") not in editors:
            editor = common.load_editor(name, device, parse_dtype(dtype), progress=False)
            if args.resolution:
                editor.model.image_size = args.resolution
            editors[(dtype, "eager")] = editor
        if (dtype, backend) not in editors:
            editors[(dtype, backend)] = speed.with_backend(editors[(dtype, "eager")], backend)
        return editors[(dtype, backend)]

    first = load(configs[0].dtype, "eager")
    settings = speed.BenchSettings(
        model=first.model.name,
        device=str(device),
        resolution=first.model.image_size,
        steps=args.steps or (10 if args.quick else None),
        warmup=args.warmup if args.warmup is not None else 1,
        repeats=args.repeats or (2 if args.quick else 3),
    )
    with quiet_libraries():  # e.g. torch.compile's warnings about the libraries' code
        rows, interrupted = speed.run_bench(load, configs, settings, progress=not args.quiet)
    info = provenance(device)
    targets = speed.targets(rows, device.type)
    print("\n".join(table_lines(rows, settings, info["device"]) + target_lines(targets)))
    if args.json:
        payload = {
            "benchmark": "speed",
            "settings": {**asdict(settings), "configs": [c.label for c in configs]},
            **info,
            "targets": targets,
            "rows": [asdict(r) for r in rows],
        }
        write_json(args.json, payload)
    if args.markdown:
        write_text(args.markdown, markdown_lines(rows, settings, info["device"], targets))
    if args.plot:
        plot(rows, args.plot, f"pyinv benchmark: {settings.model} on {info['device']}")
    if interrupted:
        print("pyinv: benchmark interrupted; the configurations measured so far are reported", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        seconds = time.perf_counter() - started
        print(f"pyinv: benchmark: {len(configs)} configurations in {seconds:.0f} s", file=sys.stderr)
    return 0 if all(r.error is None for r in rows) else 1
