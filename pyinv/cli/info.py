"""``pyinv methods`` (the inversion methods and the attention controls) and ``pyinv info``
(versions, hardware and the per-step ops' implementations)."""

from __future__ import annotations

import argparse
import json

from .control import control_epilog
from .method_flags import method_flags, option_summaries


def add_parsers(sub) -> None:
    """Register ``pyinv methods`` and ``pyinv info`` on the top-level subparsers ``sub``."""
    methods = sub.add_parser("methods", help="list the inversion methods", description="List the inversion methods.")
    methods.set_defaults(func=cmd_methods)

    info = sub.add_parser("info", help="show versions and hardware", description="Show versions and hardware.")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)


def cmd_methods(args: argparse.Namespace) -> int:
    """``pyinv methods``: one entry per registered method, then the attention controls."""
    from ..inversion import ALIASES, METHODS

    width = max(len(name) for name in METHODS) + 2
    for name, m in METHODS.items():
        print(f"{name:<{width}}{m.summary}")
        guidance = f"guidance {m.default_guidance:g}"
        inv_guidance = getattr(m, "default_inversion_guidance", None)
        if inv_guidance is not None:
            guidance += f" (inversion {inv_guidance:g})"
        details = [f"{m.default_steps} steps, {guidance}, {m.default_schedule} schedule"]
        flags = method_flags(m)
        if flags:
            details.append("options " + " ".join(flags))
        if not m.needs_source_prompt:
            details.append("--source optional")
        aliases = [a for a, target in ALIASES.items() if target == name]
        if aliases:
            details.append("aliases " + ", ".join(aliases))
        print(f"{'':<{width}}{'; '.join(details)}")
        for line in option_summaries(m):  # every option, with its default (Python keyword; flag if any)
            print(f"{'':<{width}}  {line}")
    print()
    print("attention control (pyinv edit --control):")
    for line in control_epilog().splitlines()[1:]:
        print(line)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``pyinv info``: versions, whether CUDA is usable, and the per-step ops' implementations."""
    from ..backends import availability as backend_availability
    from ..ops import availability
    from ..provenance import environment

    env = environment()
    ops = availability()
    backends = backend_availability()
    if args.json:
        print(json.dumps({**env, "ops": ops, "backends": {k: v or "ready" for k, v in backends.items()}}, indent=2))
        return 0
    width = max(len(k) for k in env) + 2
    for key, value in env.items():
        shown = (", ".join(value) or "none") if isinstance(value, list) else value
        print(f"{key + ':':<{width}}{shown}")
    print("per-step ops (implementation in use per device; available implementations):")
    for op, info in ops.items():
        used = ", ".join(f"{dev} {name}" for dev, name in info["active"].items())
        have = ", ".join(name for name, ok in info["available"].items() if ok)
        print(f"  {op}: {used}; available: {have}")
        for name, why in info["notes"].items():
            print(f"    {name}: {why}")
    print("UNet backends (--backend):")
    for name, why in backends.items():
        print(f"  {name}: {why or 'ready'}")
    return 0
