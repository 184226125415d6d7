"""``pyinv edit``'s attention-control arguments: ``--control`` and the knobs of each controller."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from .argtypes import non_negative_int, unit_float
from .errors import PyinvError

CONTROL_CHOICES = ("none", "p2p", "masactrl", "pnp")
EDIT_CHOICES = ("refine", "replace", "reweight")

#: argument name → (flag, the control it belongs to)
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

CONTROL_EPILOG = """\
attention control (--control, default p2p; none for edict):
  none       prompt swap: the target is sampled with its prompt, nothing else
  p2p        Prompt-to-Prompt: --edit refine|replace|reweight, --cross-replace,
             --self-replace, --reweight WORD=SCALE, --blend-words "SRC TGT"
  masactrl   mutual self-attention: --masa-step, --masa-layer
  pnp        Plug-and-Play: --pnp-feature-steps, --pnp-attention-steps, --negative-prompt
"""


def add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention control")
    g.add_argument("--control", choices=CONTROL_CHOICES, help="attention controller (default: p2p; none for edict)")
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


def controller_from_args(args: argparse.Namespace, method):
    """The controller ``pyinv edit`` asked for (``None`` for prompt swap); checks the knobs."""
    from .control import P2P, LocalBlend, MasaCtrl, PnP

    control = args.control or ("p2p" if method.takes_control else "none")
    for name, (flag, owner) in KNOBS.items():
        if getattr(args, name, None) is not None and owner != control:
            raise PyinvError(f"{flag} applies to --control {owner}, not {control}")
    if control == "none":
        return None
    if not method.takes_control:
        raise PyinvError(f"{method.name} runs its own coupled loop and takes no attention control (use --control none)")
    if control == "p2p":
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
        kwargs: dict[str, Any] = {"edit": args.edit_mode or "refine", "blend": blend}
        if args.cross_replace is not None:
            kwargs["cross_replace"] = _window(args.cross_replace, "--cross-replace", allow_words=True)
        if args.self_replace is not None:
            kwargs["self_replace"] = _window(args.self_replace, "--self-replace", allow_words=False)
        if args.reweight:
            kwargs["reweight"] = _reweight(args.reweight)
        return P2P(**kwargs)
    if control == "masactrl":
        kwargs = {}
        if args.masa_step is not None:
            kwargs["start_step"] = args.masa_step
        if args.masa_layer is not None:
            kwargs["start_layer"] = args.masa_layer
        return MasaCtrl(**kwargs)
    kwargs = {}
    if args.pnp_feature_steps is not None:
        kwargs["feature_steps"] = args.pnp_feature_steps
    if args.pnp_attention_steps is not None:
        kwargs["attention_steps"] = args.pnp_attention_steps
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    return PnP(**kwargs)
