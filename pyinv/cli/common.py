"""What the ``pyinv`` commands share: exit statuses, the model arguments, checks of prompts
and output paths, loading the model, writing outputs all or nothing, the summary line and
the one-line error report.

The commands reach :data:`DEFAULT_MODEL` and :func:`load_editor` through this module
(``common.load_editor(...)``), so that replacing either here changes it for every command.
Only light modules are imported at the top: torch and the model libraries load inside the
commands, where Ctrl-C is handled (:func:`interrupt_exits`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..argtypes import seed_arg
from ..checks import check_text
from ..errors import PyinvError

if TYPE_CHECKING:
    import torch
    from PIL import Image

PROG = "pyinv"
DEFAULT_MODEL = "demo"

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


class UsageError(Exception):
    """A command-line usage mistake (reported like a :class:`PyinvError`, exit status 2)."""


# ---------------------------------------------------------------------- arguments
def add_model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """The ``model and runtime`` group: ``--model``, ``--device``, ``--dtype``, ``--vae``,
    ``--backend``, ``--seed``, ``--quiet``."""
    from ..backends import BACKENDS

    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", metavar="NAME_OR_PATH", help=model_help)
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp32)")
    g.add_argument(
        "--vae",
        metavar="NAME_OR_PATH",
        help="a VAE (diffusers AutoencoderKL folder or hub id) in place of the model's own, e.g. an "
        "fp16-fixed SDXL VAE (without one an fp16 decode that overflows is redone in fp32)",
    )
    g.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        help="how the UNet runs: eager (PyTorch, the default), compile (torch.compile; the first "
        "call of each batch layout compiles), onnxruntime (exported ONNX graphs; pyinv[export]) or "
        "tensorrt (TensorRT engines on a CUDA GPU; pyinv[tensorrt])",
    )
    g.add_argument(
        "--seed", type=seed_arg, metavar="S", help="seed for random draws, 0 … 2**64-1 (for reproducible runs)"
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary line")


# ---------------------------------------------------------------------- checks before the model loads
def checked_prompt(text: str | None, flag: str) -> str | None:
    """``text`` unchanged, or a clear error when it was given but is blank or not valid text."""
    if text is not None:
        check_text(text, flag)
    if text is not None and not text.strip():
        raise PyinvError(f"{flag} is empty")
    return text


def read_image(path: str):
    """The input image as RGB, or one clear error (read before any model is loaded)."""
    from ..imageio import load_image

    return load_image(path)


def load_inversion(path: str):
    """Read an inversion file (without a model: a cheap check before loading one)."""
    from ..inversion import Inversion

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


def image_outputs(path: str, count: int) -> list[str]:
    """The ``count`` image files to write for ``--out path`` (numbered for several), each checked writable."""
    from ..imageio import check_writable, image_format

    image_format(path)
    return [check_writable(p) for p in _numbered(path, count)]


def inversion_output(path: str, flag: str) -> str:
    """``path`` as an inversion file to write: not an image name, and writable."""
    from ..imageio import IMAGE_FORMATS, check_writable

    if os.path.splitext(path)[1].lower() in IMAGE_FORMATS:
        raise PyinvError(f"{flag} is an inversion file (.safetensors), not an image: {path}")
    return check_writable(path)


def distinct(paths: Sequence[str]) -> None:
    """Refuse two outputs that name the same file."""
    seen: set[str] = set()
    for p in paths:
        key = os.path.abspath(p)
        if key in seen:
            raise PyinvError(f"two outputs would be written to the same file: {p}")
        seen.add(key)


def runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The ``--device`` and ``--dtype`` asked for."""
    from ..models import parse_device, parse_dtype

    return parse_device(args.device), parse_dtype(args.dtype)


# ---------------------------------------------------------------------- loading the model
def quiet_libraries():
    """Silence the libraries' log messages and warnings for a block (see :func:`pyinv.models.quiet_libraries`)."""
    from ..models import quiet_libraries

    return quiet_libraries()


@contextlib.contextmanager
def interrupt_exits() -> Iterator[None]:
    """While the libraries are imported and the model loads, Ctrl-C ends the process at once
    with the one ``interrupted`` line and status 130. A KeyboardInterrupt raised inside
    import code can be swallowed (numpy's C initialisation turns it into an ImportError that
    torch tolerates) or leave a half-imported module behind; nothing is written yet to clean up."""

    def stop(signum, frame):
        fail("interrupted", EXIT_INTERRUPTED)
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


def load_editor(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    backend: str | None = None,
    vae: str | None = None,
):
    """Load the model (the one expensive setup step), without library chatter on stderr; its
    UNet runs on ``backend`` (``None``: eager), with ``vae`` in place of its own VAE if given."""
    with interrupt_exits():
        from ..api import Editor

        return Editor.from_pretrained(model, device=device, dtype=dtype, progress=progress, backend=backend, vae=vae)


# ---------------------------------------------------------------------- outputs
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


def write_outputs(images: Sequence[Image.Image], paths: Sequence[str], inv, inv_path: str | None) -> list[str]:
    """Write every output (atomically each), and ``inv`` to ``inv_path`` when both are given;
    on any failure none of them is left."""
    from ..imageio import save_image

    with _all_or_nothing() as written:
        for img, path in zip(images, paths, strict=True):
            save_image(img, path)
            written.append(path)
        if inv is not None and inv_path is not None:
            inv.save(inv_path)
            written.append(inv_path)
    return written


def summary(args: argparse.Namespace, what: str, paths: Sequence[str], started: float, forwards: int) -> None:
    """The one summary line on stderr (none with ``--quiet``)."""
    if args.quiet:
        return
    seconds = time.perf_counter() - started
    print(
        f"{PROG}: {what}: wrote {', '.join(paths)} in {seconds:.1f} s ({forwards} UNet image-forwards)", file=sys.stderr
    )


# ---------------------------------------------------------------------- errors
def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "unknown error"


def fail(message: str, status: int) -> int:
    """Report ``message`` as the one ``pyinv: error: …`` line on stderr; returns ``status``."""
    with contextlib.suppress(OSError):  # stderr may be a closed pipe as well
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status
