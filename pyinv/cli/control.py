"""``pyinv edit``'s attention-control arguments: ``--control`` and the knobs of each controller.

The control names, their summaries and the controllers they build come from
:mod:`pyinv.control.registry`; this module adds each control's flags (:data:`KNOBS`) and
turns them into the controller's settings (:data:`SETTINGS`). The registry is imported
inside the functions: it loads torch, which the command line imports only once Ctrl-C is
handled.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ..argtypes import non_negative_int, unit_float
from ..errors import PyinvError

EDIT_CHOICES = ("refine", "replace", "reweight")

#: argument name → (flag, the control it belongs to: a name in :data:`pyinv.control.CONTROL_NAMES`)
KNOBS = {
    "edit_mode": ("--edit", "p2p"),
    "cross_replace": ("--cross-replace", "p2p"),
    "self_replace": ("--self-replace", "p2p"),
    "reweight": ("--reweight", "p2p"),
    "blend_words": ("--blend-words", "p2p"),
    "blend_threshold": ("--blend-threshold", "p2p"),
    "blend_start": ("--blend-start", "p2p"),
    "masa_step": ("--masa-step", "masactrl"),
    "masa_layer": ("--masa-layer", "masactrl"),
    "pnp_feature_steps": ("--pnp-feature-steps", "pnp"),
    "pnp_attention_steps": ("--pnp-attention-steps", "pnp"),
    "negative_prompt": ("--negative-prompt", "pnp"),
}

#: the flags of each control, as the help lists them after the control's summary
FLAG_HINTS = {
    "p2p": "--edit refine|replace|reweight, --cross-replace,\n"
    '--self-replace, --reweight WORD=SCALE, --blend-words "SRC TGT"',
    "masactrl": "--masa-step, --masa-layer",
    "pnp": "--pnp-feature-steps, --pnp-attention-steps, --negative-prompt",
}


def control_epilog() -> str:
    """The help's list of the controls: one entry per registered control, its summary and flags."""
    from ..control.registry import DEFAULT_CONTROL, KINDS

    lines = [f"attention control (--control, default {DEFAULT_CONTROL}; none for edict):"]
    for name, kind in KINDS.items():
        text = kind.summary + (f": {FLAG_HINTS[name]}" if name in FLAG_HINTS else "")
        first, *rest = text.splitlines()
        lines.append(f"  {name:<10} {first}")
        lines += [f"  {'':<10} {line}" for line in rest]
    return "\n".join(lines) + "\n"


def add_control_args(p: argparse.ArgumentParser) -> None:
    """``--control`` (one of the registered controls) and each control's flags."""
    from ..control.registry import CONTROL_NAMES, DEFAULT_CONTROL

    g = p.add_argument_group("attention control")
    g.add_argument(
        "--control", choices=CONTROL_NAMES, help=f"attention controller (default: {DEFAULT_CONTROL}; none for edict)"
    )
    g.add_argument("--edit", dest="edit_mode", choices=EDIT_CHOICES, help="p2p: the edit (default refine)")
    g.add_argument(
        "--cross-replace",
        metavar="W",
        help="p2p: cross-attention window: a fraction (0.8), START:END, or JSON with per-word "
        'windows \'{"default_": 0.8, "dog": [0, 0.5]}\' (default 0.8; 0.6 with edit-friendly)',
    )
    g.add_argument(
        "--self-replace",
        metavar="W",
        help="p2p: self-attention window: a fraction or START:END (0.4; 0.2 with edit-friendly)",
    )
    g.add_argument(
        "--reweight",
        metavar="WORD=SCALE",
        action="append",
        help="p2p: scale a target word's cross-attention (repeatable)",
    )
    g.add_argument(
        "--blend-words",
        metavar='"SRC TGT"',
        help="p2p: LocalBlend: keep the image outside these words' region (comma-separate several words)",
    )
    g.add_argument("--blend-threshold", type=unit_float, metavar="T", help="p2p: LocalBlend threshold (default 0.3)")
    g.add_argument(
        "--blend-start", type=unit_float, metavar="F", help="p2p: fraction of steps before blending (default 0.2)"
    )
    g.add_argument("--masa-step", type=non_negative_int, metavar="S", help="masactrl: first controlled step (4)")
    g.add_argument(
        "--masa-layer",
        type=non_negative_int,
        metavar="L",
        help="masactrl: first controlled self-attention layer (default 10 of SD's 16, scaled to the model)",
    )
    g.add_argument(
        "--pnp-feature-steps", type=unit_float, metavar="F", help="pnp: fraction of steps with feature injection (0.8)"
    )
    g.add_argument(
        "--pnp-attention-steps",
        type=unit_float,
        metavar="F",
        help="pnp: fraction of steps with self-attention injection (0.5)",
    )
    g.add_argument("--negative-prompt", metavar="TEXT", help="pnp: the targets' negative prompt")


def _window(text: str, flag: str, allow_words: bool) -> Any:
    text = text.strip()
    if allow_words and text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PyinvError(f"{flag}: not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise PyinvError(f"{flag} must be a fraction, START:END or a JSON object")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    try:
        if ":" in text:
            start, end = text.split(":", 1)
            return (float(start), float(end))
        return float(text)
    except ValueError:
        shapes = "a fraction, START:END" + (" or a JSON object" if allow_words else "")
        raise PyinvError(f"{flag} must be {shapes}, got {text!r}") from None


def _reweight(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        word, sep, value = item.rpartition("=")
        if not sep or not word.strip():
            raise PyinvError(f"--reweight takes WORD=SCALE, got {item!r}")
        try:
            scale = float(value)
        except ValueError:
            raise PyinvError(f"--reweight {item!r}: the scale must be a number") from None
        if not math.isfinite(scale):
            raise PyinvError(f"--reweight {item!r}: the scale must be a finite number")
        out[word.strip()] = scale
    return out


def _blend_words(text: str) -> tuple[list[str], list[str]]:
    parts = text.split()
    if len(parts) != 2:
        raise PyinvError(
            f'--blend-words takes "SRC TGT" (a source and a target word; comma-separate several), got {text!r}'
        )
    return parts[0].split(","), parts[1].split(",")


def _p2p_settings(args: argparse.Namespace) -> dict[str, Any]:
    from ..control import LocalBlend

    blend = None
    if args.blend_words is not None:
        src, tgt = _blend_words(args.blend_words)
        extra = {}
        if args.blend_threshold is not None:
            extra["threshold"] = args.blend_threshold
        if args.blend_start is not None:
            extra["start"] = args.blend_start
        blend = LocalBlend(src, tgt, **extra)
    elif args.blend_threshold is not None or args.blend_start is not None:
        raise PyinvError("--blend-threshold and --blend-start need --blend-words")
    settings: dict[str, Any] = {"edit": args.edit_mode or "refine", "blend": blend}
    if args.cross_replace is not None:
        settings["cross_replace"] = _window(args.cross_replace, "--cross-replace", allow_words=True)
    if args.self_replace is not None:
        settings["self_replace"] = _window(args.self_replace, "--self-replace", allow_words=False)
    if args.reweight:
        settings["reweight"] = _reweight(args.reweight)
    return settings


def _masactrl_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {}
    if args.masa_step is not None:
        settings["start_step"] = args.masa_step
    if args.masa_layer is not None:
        settings["start_layer"] = args.masa_layer
    return settings


def _pnp_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {}
    if args.pnp_feature_steps is not None:
        settings["feature_steps"] = args.pnp_feature_steps
    if args.pnp_attention_steps is not None:
        settings["attention_steps"] = args.pnp_attention_steps
    if args.negative_prompt is not None:
        settings["negative_prompt"] = args.negative_prompt
    return settings


#: control name → its constructor settings from the parsed flags (the defaults where none is given)
SETTINGS = {"p2p": _p2p_settings, "masactrl": _masactrl_settings, "pnp": _pnp_settings}


def controller_from_args(args: argparse.Namespace, method):
    """The controller ``pyinv edit`` asked for (``None`` for prompt swap); checks the knobs."""
    from ..control.registry import DEFAULT_CONTROL, NONE, build_controller

    control = args.control or (DEFAULT_CONTROL if method.takes_control else NONE)
    for name, (flag, owner) in KNOBS.items():
        if getattr(args, name, None) is not None and owner != control:
            raise PyinvError(f"{flag} applies to --control {owner}, not {control}")
    if control == NONE:
        return None
    if not method.takes_control:
        raise PyinvError(f"{method.name} runs its own coupled loop and takes no attention control (use --control none)")
    settings = SETTINGS[control](args) if control in SETTINGS else {}
    return build_controller(control, **settings)
