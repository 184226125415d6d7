"""``pyinv invert`` (write an inversion file) and ``pyinv edit`` (invert and edit an image,
or edit a saved inversion)."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from ..argtypes import guidance_arg, positive_int
from ..errors import PyinvError
from . import common
from .common import (
    UsageError,
    add_model_args,
    checked_prompt,
    distinct,
    image_outputs,
    inversion_output,
    load_inversion,
    read_image,
    runtime,
    summary,
    write_outputs,
)
from .control import add_control_args, control_epilog, controller_from_args
from .method_flags import add_edit_flags, add_invert_flags, check_skip, invert_flags, method_options

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_METHOD = "direct"

#: Arguments of ``pyinv edit`` that only make sense when an image is inverted in the same run
#: (and the methods' inversion options: :func:`.method_flags.invert_flags`).
INVERT_ONLY = {
    "source": "--source",
    "method": "--method",
    "steps": "--steps",
    "schedule": "--schedule",
    "save_inversion": "--save-inversion",
    "inversion_guidance": "--inversion-guidance",
}

EDIT_EPILOG = """\
With several --target prompts all edits run as one batch and the outputs are named
after --out with a number: --out dog.png --target A --target B writes dog-1.png and
dog-2.png. The output format follows the extension (.png, .jpg, .webp, .bmp, .tif).

examples:
  pyinv edit cat.png --source "a photo of a cat" --target "a photo of a dog" --out dog.png
  pyinv invert cat.png --source "a photo of a cat" --method null-text --out cat.safetensors
  pyinv edit --inversion cat.safetensors --target "a photo of a fox" --out fox.png
  pyinv edit cat.png --source "a photo of a cat" --target "a photo of a dog" \\
      --blend-words "cat dog" --out dog.png
  pyinv edit cat.png --source "a cat" --target "a cat" --control p2p --edit reweight \\
      --reweight cat=2 --out big-cat.png

"""


# ---------------------------------------------------------------------- parsers
def _method_names() -> str:
    from ..inversion import METHODS

    return ", ".join(METHODS)


def _add_invert_args(p: argparse.ArgumentParser) -> None:
    """The ``inversion`` group: ``--method``, ``--steps``, ``--schedule`` and the methods' inversion flags."""
    from ..schedule import SCHEDULE_MODES

    g = p.add_argument_group("inversion")
    g.add_argument(
        "--method",
        metavar="NAME",
        help=f"inversion method: {_method_names()} (default: {DEFAULT_METHOD}); see 'pyinv methods'",
    )
    g.add_argument("--steps", type=positive_int, metavar="N", help="inference steps (default: the method's)")
    g.add_argument(
        "--schedule",
        choices=SCHEDULE_MODES,
        help="timestep spacing: reference (the papers' code: 981, 961, …, 1 for 50 steps), checkpoint (the "
        "model's own config), leading (980 … 0) or trailing (999 … 19); default: the method's",
    )
    add_invert_flags(g)


def add_parsers(sub) -> None:
    """Register ``pyinv edit`` and ``pyinv invert`` on the top-level subparsers ``sub``."""
    edit = sub.add_parser(
        "edit",
        help="invert an image (or load an inversion) and edit it with text",
        description="Edit an image with text: invert IMAGE described by --source, then sample "
        "towards each --target; or edit a saved inversion (--inversion FILE).",
        epilog=EDIT_EPILOG + control_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edit.add_argument("image", nargs="?", metavar="IMAGE", help="the image to edit (or give --inversion)")
    edit.add_argument("--inversion", metavar="FILE", help="edit this saved inversion instead of an image")
    edit.add_argument("--source", metavar="TEXT", help="prompt describing IMAGE (optional for prompt-tuning)")
    edit.add_argument(
        "--target",
        metavar="TEXT",
        action="append",
        required=True,
        help="prompt describing the edited image; repeat for several edits in one batch",
    )
    edit.add_argument(
        "--guidance",
        type=guidance_arg,
        metavar="W",
        help="classifier-free guidance scale of the edit (default: the method's)",
    )
    edit.add_argument(
        "--inversion-guidance",
        type=guidance_arg,
        metavar="W",
        help="guidance the inversion is made for (default: --guidance, or the method's own "
        "inversion guidance where it has one, e.g. edit-friendly's 3.5)",
    )
    edit.add_argument("--out", metavar="PATH", required=True, help="output image (numbered with several --target)")
    edit.add_argument("--save-inversion", metavar="FILE", help="also write the inversion (safetensors)")
    _add_invert_args(edit)
    add_edit_flags(edit)
    add_control_args(edit)
    add_model_args(
        edit,
        f"model preset, diffusers folder or hub id (default: {common.DEFAULT_MODEL}; "
        "with --inversion: the model the inversion was made with)",
    )
    edit.set_defaults(func=cmd_edit)

    inv = sub.add_parser(
        "invert",
        help="invert an image and save the inversion for later edits",
        description="Invert IMAGE described by --source and write the inversion (safetensors) "
        "for 'pyinv edit --inversion'.",
    )
    inv.add_argument("image", metavar="IMAGE", help="the image to invert")
    inv.add_argument("--source", metavar="TEXT", help="prompt describing IMAGE")
    inv.add_argument(
        "--guidance",
        type=guidance_arg,
        metavar="W",
        help="guidance the inversion is made for (default: the method's)",
    )
    inv.add_argument("--out", metavar="FILE", required=True, help="inversion file to write (.safetensors)")
    _add_invert_args(inv)
    add_model_args(inv, f"model preset, diffusers folder or hub id (default: {common.DEFAULT_MODEL})")
    inv.set_defaults(func=cmd_invert)


# ---------------------------------------------------------------------- commands
def _inversion_guidance(args: argparse.Namespace, algo) -> float | None:
    """The guidance to invert with in ``pyinv edit IMAGE``: the one asked for, else the edit's
    guidance, unless the method inverts at its own guidance (edit-friendly's cfg_src)."""
    if args.inversion_guidance is not None:
        return args.inversion_guidance
    if algo.default_inversion_guidance is not None:
        return None
    return args.guidance


def _invert(
    editor,
    image: Image.Image,
    args: argparse.Namespace,
    algo,
    source: str | None,
    guidance: float | None,
    options: dict[str, Any],
):
    return editor.invert(
        image,
        source or "",
        method=algo.name,
        steps=args.steps,
        guidance=guidance,
        schedule=args.schedule,
        seed=args.seed,
        **options,
    )


def cmd_invert(args: argparse.Namespace) -> int:
    """``pyinv invert``: write an inversion file."""
    from ..inversion import get_method

    started = time.perf_counter()
    algo = get_method(args.method or DEFAULT_METHOD)
    source = checked_prompt(args.source, "--source")
    options = method_options(args, algo, "invert")
    if source is None:
        if algo.needs_source_prompt:
            raise PyinvError(f"method {algo.name!r} needs --source, a prompt describing the image")
        if "init_prompt" in algo.invert_options:
            raise PyinvError(
                f"method {algo.name!r} needs --source here ('pyinv edit' can start from the target prompt instead)"
            )
    device, dtype = runtime(args)
    out = inversion_output(args.out, "--out")
    image = read_image(args.image)
    editor = common.load_editor(
        args.model or common.DEFAULT_MODEL,
        device,
        dtype,
        progress=not args.quiet,
        backend=getattr(args, "backend", None),
        vae=getattr(args, "vae", None),
    )
    before = editor.model.unet_image_forwards
    inv = _invert(editor, image, args, algo, source, args.guidance, options)
    inv.save(out)
    summary(
        args,
        f"inverted with {algo.name} ({inv.num_steps} steps)",
        [out],
        started,
        editor.model.unet_image_forwards - before,
    )
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """``pyinv edit``: invert and edit an image, or edit a saved inversion."""
    if (args.image is None) == (args.inversion is None):
        raise UsageError(
            "give either IMAGE or --inversion FILE"
            + (", not both" if args.image else "")
            + " (see 'pyinv edit --help')"
        )
    targets = [checked_prompt(t, "--target") for t in args.target]
    if args.inversion is not None:
        return _edit_inversion(args, targets)
    return _edit_image(args, targets)


def _edit_image(args: argparse.Namespace, targets: list[str]) -> int:
    from ..inversion import get_method

    started = time.perf_counter()
    algo = get_method(args.method or DEFAULT_METHOD)
    source = checked_prompt(args.source, "--source")
    invert_options = method_options(args, algo, "invert")
    edit_options = method_options(args, algo, "edit")
    if source is None:
        if algo.needs_source_prompt:
            raise PyinvError(f"method {algo.name!r} needs --source, a prompt describing the image")
        if "init_prompt" in algo.invert_options:
            invert_options["init_prompt"] = targets[0]
    check_skip(algo, edit_options, args.steps or algo.default_steps)
    control = controller_from_args(args, algo)
    device, dtype = runtime(args)
    outputs = image_outputs(args.out, len(targets))
    saved = inversion_output(args.save_inversion, "--save-inversion") if args.save_inversion else None
    distinct(outputs + ([saved] if saved else []))
    image = read_image(args.image)
    editor = common.load_editor(
        args.model or common.DEFAULT_MODEL,
        device,
        dtype,
        progress=not args.quiet,
        backend=getattr(args, "backend", None),
        vae=getattr(args, "vae", None),
    )
    editor.check_prompts(source, targets)  # before the controller looks words up in them
    if control is not None:
        control.check_prompts(editor.model, source or "", targets, args.steps or algo.steps_for(editor.model))
    before = editor.model.unet_image_forwards
    inv = _invert(editor, image, args, algo, source, _inversion_guidance(args, algo), invert_options)
    result = editor.edit(inv, targets, guidance=args.guidance, control=control, seed=args.seed, **edit_options)
    written = write_outputs(result.images, outputs, inv, saved)
    summary(
        args,
        f"edited with {algo.name}{_control_name(control)} ({inv.num_steps} steps)",
        written,
        started,
        editor.model.unet_image_forwards - before,
    )
    return 0


def _edit_inversion(args: argparse.Namespace, targets: list[str]) -> int:
    from ..inversion import get_method

    started = time.perf_counter()
    invert_only = {**INVERT_ONLY, **invert_flags()}
    given = [flag for name, flag in invert_only.items() if getattr(args, name) is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot be used with --inversion (the inversion file fixes how the image was inverted)"
        )
    inv = load_inversion(args.inversion)
    algo = get_method(inv.method)
    edit_options = method_options(args, algo, "edit")
    check_skip(algo, edit_options, inv.num_steps)
    control = controller_from_args(args, algo)
    device, dtype = runtime(args)
    outputs = image_outputs(args.out, len(targets))
    distinct(outputs)
    model = args.model or inv.model.get("name") or common.DEFAULT_MODEL
    editor = common.load_editor(
        model,
        device,
        dtype,
        progress=not args.quiet,
        backend=getattr(args, "backend", None),
        vae=getattr(args, "vae", None),
    )
    before = editor.model.unet_image_forwards
    result = editor.edit(inv, targets, guidance=args.guidance, control=control, seed=args.seed, **edit_options)
    written = write_outputs(result.images, outputs, None, None)
    forwards = editor.model.unet_image_forwards - before
    summary(args, f"edited {args.inversion} ({algo.name}{_control_name(control)})", written, started, forwards)
    return 0


def _control_name(control) -> str:
    return f" + {type(control).__name__}" if control is not None else ""
