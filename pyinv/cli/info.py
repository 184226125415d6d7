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


#: the model families pyinv runs (``DiffusionModel.family``), as ``pyinv info`` names them
FAMILIES = {
    "SD": "Stable Diffusion 1.x/2.x (epsilon or v prediction; latent or pixel space)",
    "SDXL": "Stable Diffusion XL base (two text encoders, pooled embedding and time ids)",
}


def family_support() -> dict[str, dict]:
    """Per model family: what runs on it (every method and controller; the backends whose
    ``families`` include it) and the methods' defaults there (:meth:`Method.defaults_for`)."""
    from ..backends import BACKENDS
    from ..control.registry import CONTROL_NAMES
    from ..inversion import METHODS

    return {
        family: {
            "models": about,
            "methods": list(METHODS),
            "controls": list(CONTROL_NAMES),
            "backends": [name for name, cls in BACKENDS.items() if family in cls.families],
            "defaults": {name: m.defaults_for(family) for name, m in METHODS.items()},
        }
        for family, about in FAMILIES.items()
    }


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
        for family, own in m.family_defaults.items():  # a reference's defaults on that family
            shown = [f"{own['steps']} steps"] if "steps" in own else []
            shown += [f"guidance {own['guidance']:g}"] if "guidance" in own else []
            shown += [f"inversion guidance {own['inversion_guidance']:g}"] if "inversion_guidance" in own else []
            details.append(f"on {family} " + ", ".join(shown))
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
    print()
    print("models (pyinv --model): every method and control runs on")
    for family, support in family_support().items():
        print(f"  {family:<6}{support['models']}; backends {', '.join(support['backends'])}")
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
        ready = {k: v or "ready" for k, v in backends.items()}
        print(json.dumps({**env, "ops": ops, "backends": ready, "families": family_support()}, indent=2))
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
    print("model families (--model): every method and control on each")
    for family, support in family_support().items():
        print(f"  {family}: {support['models']}; backends: {', '.join(support['backends'])}")
    sd = family_support()["SD"]["defaults"]
    for family, support in family_support().items():
        for name, own in support["defaults"].items():
            if own != sd[name]:
                changed = ", ".join(f"{key} {value:g}" for key, value in own.items() if value != sd[name][key])
                print(f"    {name} on {family}: {changed}")
    return 0
