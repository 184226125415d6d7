"""The ``pyinv`` command line: ``edit``, ``invert``, ``generate``, ``eval``, ``benchmark``,
``export``, ``methods`` and ``info``.

Every user mistake (bad arguments, unreadable image, unknown model or method, an
inversion file from another model, an unwritable output, Ctrl-C) ends as exactly one line
``pyinv: error: …`` on stderr and a non-zero exit status, never a traceback. Cheap checks
(arguments, input image, output paths, inversion file) run before the model is loaded, and
outputs are written atomically: a failed run leaves none of its files behind.

Exit status: 0 success, 1 error, 2 usage error, 130 interrupted (Ctrl-C, also while the
libraries load: they are imported inside :func:`main`), 141 stdout closed early (a pipe
into ``head``; nothing is printed).

One module per command group: :mod:`.edit` (``edit``, ``invert``), :mod:`.generate`,
:mod:`.eval`, :mod:`.bench` (``benchmark``), :mod:`.export` and :mod:`.info` (``methods``, ``info``);
:mod:`.control` holds ``--control`` and each controller's flags, :mod:`.method_flags` the
inversion methods' own flags, and :mod:`.common` what the commands share. This module
builds the parser and runs a command (:func:`main`, the ``pyinv`` console entry point).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import PyinvError
from .common import (
    EXIT_CLOSED_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    UsageError,
    fail,
    interrupt_exits,
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line exceptions instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyinv`` argument parser with its subcommands."""
    from .. import __version__
    from . import bench, edit, export, generate, info, serve
    from . import eval as evaluate

    parser = _Parser(
        prog=PROG, description="Invert real images into text-to-image diffusion models and edit them with text."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    edit.add_parsers(sub)  # edit, invert
    generate.add_parser(sub)
    evaluate.add_eval_parser(sub)
    bench.add_benchmark_parser(sub)
    export.add_parser(sub)
    serve.add_parser(sub)
    info.add_parsers(sub)  # methods, info
    return parser


# ---------------------------------------------------------------------- entry point
def _os_error(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return fail(str(code), EXIT_ERROR)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; errors propagate (see :func:`main`)."""
    with interrupt_exits():  # building the parser imports torch and the benchmarks
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
        return fail(str(exc), EXIT_USAGE)
    except PyinvError as exc:
        return fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except OSError as exc:
        return fail(_os_error(exc), EXIT_ERROR)
    except Exception as exc:
        if _out_of_memory(exc):
            return fail("out of GPU memory; try --dtype fp16, fewer --target prompts or a smaller model", EXIT_ERROR)
        raise


if __name__ == "__main__":
    sys.exit(main())
