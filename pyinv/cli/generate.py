"""``pyinv generate``: sample images from a text prompt (e.g. to make a source image)."""

from __future__ import annotations

import argparse
import time

from ..argtypes import count_arg, guidance_arg, positive_int
from ..checks import check_seed
from . import common
from .common import add_model_args, checked_prompt, image_outputs, runtime, summary, write_outputs


def add_parser(sub) -> None:
    """Register ``pyinv generate`` on the top-level subparsers ``sub``."""
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
    add_model_args(gen, f"model preset, diffusers folder or hub id (default: {common.DEFAULT_MODEL})")
    gen.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """``pyinv generate``: text-to-image samples."""
    started = time.perf_counter()
    prompt = checked_prompt(args.prompt, "PROMPT")
    device, dtype = runtime(args)
    outputs = image_outputs(args.out, args.count)
    seed = check_seed(0 if args.seed is None else args.seed, "--seed", count=args.count)
    editor = common.load_editor(
        args.model or common.DEFAULT_MODEL,
        device,
        dtype,
        progress=not args.quiet,
        backend=getattr(args, "backend", None),
        vae=getattr(args, "vae", None),
    )
    before = editor.model.unet_image_forwards
    seeds = list(range(seed, seed + args.count))
    images = editor.generate(
        [prompt] * args.count, seeds, steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt
    )
    written = write_outputs(images, outputs, None, None)
    what = f"generated {args.count} image{'s' if args.count > 1 else ''} ({args.steps} steps, seed {seed})"
    summary(args, what, written, started, editor.model.unet_image_forwards - before)
    return 0
