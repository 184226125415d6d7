"""The ``pyinv`` command line: ``edit``, ``invert``, ``generate``, ``eval``, ``methods`` and ``info``.

Every user mistake (bad arguments, unreadable image, unknown model or method, an
inversion file from another model, an unwritable output, Ctrl-C) ends as exactly one line
``pyinv: error: …`` on stderr and a non-zero exit status, never a traceback. Cheap checks
(arguments, input image, output paths, inversion file) run before the model is loaded, and
outputs are written atomically: a failed run leaves none of its files behind.

Exit status: 0 success, 1 error, 2 usage error, 130 interrupted (Ctrl-C, also while the
libraries load: they are imported inside :func:`main`), 141 stdout closed early (a pipe
into ``head``; nothing is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .argtypes import count_arg, guidance_arg, positive_int, seed_arg
from .checks import check_seed, check_text
from .cli_control import CONTROL_EPILOG, add_control_args, controller_from_args
from .errors import PyinvError

if TYPE_CHECKING:  # the heavy libraries load inside main(), where Ctrl-C is handled
    import torch
    from PIL import Image

PROG = "pyinv"
DEFAULT_MODEL = "demo"
DEFAULT_METHOD = "direct"

#: Arguments of ``pyinv edit`` that only make sense when an image is inverted in the same run
#: (and the methods' inversion options: their flags come from :mod:`pyinv.inversion.options`).
INVERT_ONLY = {
    "source": "--source",
    "method": "--method",
    "steps": "--steps",
    "schedule": "--schedule",
    "save_inversion": "--save-inversion",
    "inversion_guidance": "--inversion-guidance",
}

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


class UsageError(Exception):
    """A command-line usage mistake (reported like a :class:`PyinvError`, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line exceptions instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------- parser
def _method_names() -> str:
    from .inversion import METHODS

    return ", ".join(METHODS)


def _add_model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", metavar="NAME_OR_PATH", help=model_help)
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp32)")
    g.add_argument(
        "--seed", type=seed_arg, metavar="S", help="seed for random draws, 0 … 2**64-1 (for reproducible runs)"
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary line")


def _add_invert_args(p: argparse.ArgumentParser) -> None:
    from .inversion.options import add_arguments
    from .schedule import SCHEDULE_MODES

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
    add_arguments(g, "invert")  # the methods' inversion options (--form, --inner-steps, …)


def _add_edit_option_args(p: argparse.ArgumentParser) -> None:
    from .inversion.options import add_arguments

    add_arguments(p.add_argument_group("editing"), "edit")  # the methods' edit options (--eta, --skip, …)


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
EDIT_EPILOG += CONTROL_EPILOG


def build_parser() -> argparse.ArgumentParser:
    """The ``pyinv`` argument parser with its subcommands."""
    from . import __version__
    from .cli_bench import add_benchmark_parser
    from .cli_eval import add_eval_parser

    parser = _Parser(
        prog=PROG, description="Invert real images into text-to-image diffusion models and edit them with text."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    edit = sub.add_parser(
        "edit",
        help="invert an image (or load an inversion) and edit it with text",
        description="Edit an image with text: invert IMAGE described by --source, then sample "
        "towards each --target; or edit a saved inversion (--inversion FILE).",
        epilog=EDIT_EPILOG,
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
    _add_edit_option_args(edit)
    add_control_args(edit)
    _add_model_args(
        edit,
        f"model preset, diffusers folder or hub id (default: {DEFAULT_MODEL}; "
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
    _add_model_args(inv, f"model preset, diffusers folder or hub id (default: {DEFAULT_MODEL})")
    inv.set_defaults(func=cmd_invert)

    gen = sub.add_parser(
        "generate",
        help="sample an image from a text prompt (e.g. to make a source image)",
        description="Sample images from PROMPT with DDIM and classifier-free guidance. An image "
        "depends only on the model, prompt, seed, steps and guidance.",
        epilog='examples:\n  pyinv generate "a red circle on a blue background" --out red-circle.png\n'
        '  pyinv generate "a green square on a white background" --seed 3 --count 4 --out square.png',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", metavar="PROMPT", help="what to draw")
    gen.add_argument("--out", metavar="PATH", required=True, help="output image (numbered with --count > 1)")
    gen.add_argument("--steps", type=positive_int, default=50, metavar="N", help="sampling steps (default 50)")
    gen.add_argument(
        "--guidance", type=guidance_arg, default=7.5, metavar="W", help="classifier-free guidance (default 7.5)"
    )
    gen.add_argument("--negative-prompt", metavar="TEXT", default="", help="unconditional prompt (default empty)")
    gen.add_argument(
        "--count",
        type=count_arg,
        default=1,
        metavar="N",
        help="images to sample (at most 100, one batch), with seeds SEED … SEED+N−1",
    )
    _add_model_args(gen, f"model preset, diffusers folder or hub id (default: {DEFAULT_MODEL})")
    gen.set_defaults(func=cmd_generate)

    add_eval_parser(sub, _add_model_args)
    add_benchmark_parser(sub)

    methods = sub.add_parser("methods", help="list the inversion methods", description="List the inversion methods.")
    methods.set_defaults(func=cmd_methods)

    info = sub.add_parser("info", help="show versions and hardware", description="Show versions and hardware.")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return parser


# ---------------------------------------------------------------------- validation helpers
def _prompt(text: str | None, flag: str) -> str | None:
    """``text`` unchanged, or a clear error when it was given but is blank or not valid text."""
    if text is not None:
        check_text(text, flag)
    if text is not None and not text.strip():
        raise PyinvError(f"{flag} is empty")
    return text


def _options(args: argparse.Namespace, algo, kind: str) -> dict[str, Any]:
    """The method options of ``kind`` ("invert" or "edit") the user gave, checked against
    what ``algo`` accepts."""
    from .inversion.options import given_options

    return given_options(vars(args), algo, kind)


def _check_skip(algo, options: dict[str, Any], steps: int) -> None:
    """Fail early when the edit would skip all of the inversion's steps."""
    if "skip" not in algo.edit_options:
        return
    skip = options.get("skip", algo.edit_options["skip"])
    if isinstance(skip, int) and skip >= steps:
        given = "" if "skip" in options else f" (default {skip})"
        raise PyinvError(f"--skip{given} must be smaller than the number of steps ({steps})")


def _inversion_guidance(args: argparse.Namespace, algo) -> float | None:
    """The guidance to invert with in ``pyinv edit IMAGE``: the one asked for, else the edit's
    guidance, unless the method inverts at its own guidance (edit-friendly's cfg_src)."""
    if args.inversion_guidance is not None:
        return args.inversion_guidance
    if getattr(algo, "default_inversion_guidance", None) is not None:
        return None
    return args.guidance


def _read_image(path: str):
    """The input image as RGB, or one clear error (read before any model is loaded)."""
    from .imageio import load_image

    return load_image(path)


def _load_inversion(path: str):
    """Read an inversion file (without a model: a cheap check before loading one)."""
    from .inversion import Inversion

    try:
        return Inversion.load(path)
    except PyinvError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise PyinvError(f"inversion file has damaged metadata: {path} ({type(exc).__name__}: {exc})") from None


def _numbered(path: str, count: int) -> list[str]:
    """``[path]``, or ``stem-1.ext … stem-N.ext`` for several outputs."""
    if count == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}-{k}{ext}" for k in range(1, count + 1)]


def _image_outputs(path: str, count: int) -> list[str]:
    from .imageio import check_writable, image_format

    image_format(path)
    return [check_writable(p) for p in _numbered(path, count)]


def _inversion_output(path: str, flag: str) -> str:
    from .imageio import IMAGE_FORMATS, check_writable

    if os.path.splitext(path)[1].lower() in IMAGE_FORMATS:
        raise PyinvError(f"{flag} is an inversion file (.safetensors), not an image: {path}")
    return check_writable(path)


def _distinct(paths: Sequence[str]) -> None:
    seen: set[str] = set()
    for p in paths:
        key = os.path.abspath(p)
        if key in seen:
            raise PyinvError(f"two outputs would be written to the same file: {p}")
        seen.add(key)


def _runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from .models import parse_device, parse_dtype

    return parse_device(args.device), parse_dtype(args.dtype)


def _quiet_libraries():
    """Silence the libraries' log messages and warnings for a block (see :func:`pyinv.models.quiet_libraries`)."""
    from .models import quiet_libraries

    return quiet_libraries()


@contextlib.contextmanager
def _interrupt_exits() -> Iterator[None]:
    """While the libraries are imported and the model loads, Ctrl-C ends the process at once
    with the one ``interrupted`` line and status 130. A KeyboardInterrupt raised inside
    import code can be swallowed (numpy's C initialisation turns it into an ImportError that
    torch tolerates) or leave a half-imported module behind; nothing is written yet to clean up."""

    def stop(signum, frame):
        _fail("interrupted", EXIT_INTERRUPTED)
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def load_editor(model: str, device: torch.device, dtype: torch.dtype, progress: bool):
    """Load the model (the one expensive setup step), without library chatter on stderr."""
    with _interrupt_exits():
        from .api import Editor

        return Editor.from_pretrained(model, device=device, dtype=dtype, progress=progress)


@contextlib.contextmanager
def _all_or_nothing() -> Iterator[list[str]]:
    """Collects the paths a command writes; if the command fails, removes them all."""
    written: list[str] = []
    try:
        yield written
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def _summary(args: argparse.Namespace, what: str, paths: Sequence[str], started: float, forwards: int) -> None:
    if args.quiet:
        return
    seconds = time.perf_counter() - started
    print(
        f"{PROG}: {what}: wrote {', '.join(paths)} in {seconds:.1f} s ({forwards} UNet image-forwards)", file=sys.stderr
    )


# ---------------------------------------------------------------------- commands
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
    from .inversion import get_method

    started = time.perf_counter()
    algo = get_method(args.method or DEFAULT_METHOD)
    source = _prompt(args.source, "--source")
    options = _options(args, algo, "invert")
    if source is None:
        if algo.needs_source_prompt:
            raise PyinvError(f"method {algo.name!r} needs --source, a prompt describing the image")
        if "init_prompt" in algo.invert_options:
            raise PyinvError(
                f"method {algo.name!r} needs --source here ('pyinv edit' can start from the target prompt instead)"
            )
    device, dtype = _runtime(args)
    out = _inversion_output(args.out, "--out")
    image = _read_image(args.image)
    editor = load_editor(args.model or DEFAULT_MODEL, device, dtype, progress=not args.quiet)
    before = editor.model.unet_image_forwards
    inv = _invert(editor, image, args, algo, source, args.guidance, options)
    inv.save(out)
    _summary(
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
    targets = [_prompt(t, "--target") for t in args.target]
    if args.inversion is not None:
        return _edit_inversion(args, targets)
    return _edit_image(args, targets)


def _edit_image(args: argparse.Namespace, targets: list[str]) -> int:
    from .inversion import get_method

    started = time.perf_counter()
    algo = get_method(args.method or DEFAULT_METHOD)
    source = _prompt(args.source, "--source")
    invert_options = _options(args, algo, "invert")
    edit_options = _options(args, algo, "edit")
    if source is None:
        if algo.needs_source_prompt:
            raise PyinvError(f"method {algo.name!r} needs --source, a prompt describing the image")
        if "init_prompt" in algo.invert_options:
            invert_options["init_prompt"] = targets[0]
    _check_skip(algo, edit_options, args.steps or algo.default_steps)
    control = controller_from_args(args, algo)
    device, dtype = _runtime(args)
    outputs = _image_outputs(args.out, len(targets))
    saved = _inversion_output(args.save_inversion, "--save-inversion") if args.save_inversion else None
    _distinct(outputs + ([saved] if saved else []))
    image = _read_image(args.image)
    editor = load_editor(args.model or DEFAULT_MODEL, device, dtype, progress=not args.quiet)
    editor.check_prompts(source, targets)  # before the controller looks words up in them
    if control is not None:
        control.check_prompts(editor.model, source or "", targets, args.steps or algo.default_steps)
    before = editor.model.unet_image_forwards
    inv = _invert(editor, image, args, algo, source, _inversion_guidance(args, algo), invert_options)
    result = editor.edit(inv, targets, guidance=args.guidance, control=control, seed=args.seed, **edit_options)
    written = _write(result.images, outputs, inv, saved)
    _summary(
        args,
        f"edited with {algo.name}{_control_name(control)} ({inv.num_steps} steps)",
        written,
        started,
        editor.model.unet_image_forwards - before,
    )
    return 0


def _edit_inversion(args: argparse.Namespace, targets: list[str]) -> int:
    from .inversion import get_method
    from .inversion.options import cli_flags

    started = time.perf_counter()
    invert_only = {**INVERT_ONLY, **cli_flags("invert")}
    given = [flag for name, flag in invert_only.items() if getattr(args, name) is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot be used with --inversion (the inversion file fixes how the image was inverted)"
        )
    inv = _load_inversion(args.inversion)
    algo = get_method(inv.method)
    edit_options = _options(args, algo, "edit")
    _check_skip(algo, edit_options, inv.num_steps)
    control = controller_from_args(args, algo)
    device, dtype = _runtime(args)
    outputs = _image_outputs(args.out, len(targets))
    _distinct(outputs)
    model = args.model or inv.model.get("name") or DEFAULT_MODEL
    editor = load_editor(model, device, dtype, progress=not args.quiet)
    before = editor.model.unet_image_forwards
    result = editor.edit(inv, targets, guidance=args.guidance, control=control, seed=args.seed, **edit_options)
    written = _write(result.images, outputs, None, None)
    forwards = editor.model.unet_image_forwards - before
    _summary(args, f"edited {args.inversion} ({algo.name}{_control_name(control)})", written, started, forwards)
    return 0


def _control_name(control) -> str:
    return f" + {type(control).__name__}" if control is not None else ""


def _write(images: Sequence[Image.Image], paths: Sequence[str], inv, inv_path: str | None) -> list[str]:
    """Write every output (atomically each); on any failure none of them is left."""
    from .imageio import save_image

    with _all_or_nothing() as written:
        for img, path in zip(images, paths, strict=True):
            save_image(img, path)
            written.append(path)
        if inv is not None and inv_path is not None:
            inv.save(inv_path)
            written.append(inv_path)
    return written


def cmd_generate(args: argparse.Namespace) -> int:
    """``pyinv generate``: text-to-image samples."""
    started = time.perf_counter()
    prompt = _prompt(args.prompt, "PROMPT")
    device, dtype = _runtime(args)
    outputs = _image_outputs(args.out, args.count)
    seed = check_seed(0 if args.seed is None else args.seed, "--seed", count=args.count)
    editor = load_editor(args.model or DEFAULT_MODEL, device, dtype, progress=not args.quiet)
    before = editor.model.unet_image_forwards
    seeds = list(range(seed, seed + args.count))
    images = editor.generate(
        [prompt] * args.count, seeds, steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt
    )
    written = _write(images, outputs, None, None)
    what = f"generated {args.count} image{'s' if args.count > 1 else ''} ({args.steps} steps, seed {seed})"
    _summary(args, what, written, started, editor.model.unet_image_forwards - before)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``pyinv methods``: one entry per registered method."""
    from .inversion import ALIASES, METHODS
    from .inversion.options import fields_of, method_flags

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
        for field in fields_of(m):  # every option, with its default (Python keyword; flag if any)
            print(f"{'':<{width}}  {field.summary()}")
    print()
    print("attention control (pyinv edit --control):")
    for line in CONTROL_EPILOG.splitlines()[1:]:
        print(line)
    return 0


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """Versions and hardware, as ``pyinv info`` reports them."""
    import torch

    from . import __version__

    cuda = torch.cuda.is_available()
    return {
        "pyinv": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def cmd_info(args: argparse.Namespace) -> int:
    """``pyinv info``: versions, whether CUDA is usable, and the per-step ops' implementations."""
    from .ops import availability

    env = environment()
    ops = availability()
    if args.json:
        print(json.dumps({**env, "ops": ops}, indent=2))
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
    return 0


# ---------------------------------------------------------------------- entry point
def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "unknown error"


def _fail(message: str, status: int) -> int:
    with contextlib.suppress(OSError):  # stderr may be a closed pipe as well
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


def _os_error(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return _fail(str(code), EXIT_ERROR)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; errors propagate (see :func:`main`)."""
    with _interrupt_exits():  # building the parser imports torch and the benchmarks
        parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def _closed_pipe() -> int:
    """stdout's reader went away (``pyinv info --json | head -1``): stop quietly, as Unix
    tools do, and keep Python from complaining again when it flushes stdout at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_CLOSED_PIPE


def _out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyinv`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        status = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except BrokenPipeError:
        return _closed_pipe()
    except SystemExit as exc:  # --help / --version
        return _exit_status(exc.code)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except PyinvError as exc:
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except OSError as exc:
        return _fail(_os_error(exc), EXIT_ERROR)
    except Exception as exc:
        if _out_of_memory(exc):
            return _fail("out of GPU memory; try --dtype fp16, fewer --target prompts or a smaller model", EXIT_ERROR)
        raise


if __name__ == "__main__":
    sys.exit(main())
