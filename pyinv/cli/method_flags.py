"""The inversion methods' own flags, generated from their options dataclasses.

Each method's options are one dataclass (:mod:`pyinv.inversion.options`): its fields give
the flag, the parser, the choices and the help with the default. This module only hands
those descriptions to argparse and turns parsed arguments back into a method's options;
it holds no flag table of its own. The inversion layer is imported when a parser is built
(inside :func:`pyinv.cli.main`), so ``import pyinv.cli`` stays light.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import PyinvError


def add_invert_flags(g: Any) -> None:
    """The methods' inversion options (``--form``, ``--inner-steps``, …), added to ``g`` (the
    ``inversion`` group of ``pyinv edit`` and ``pyinv invert``)."""
    from ..inversion.options import add_arguments

    add_arguments(g, "invert")


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    """The ``editing`` group: the methods' edit options (``--eta``, ``--skip``, …)."""
    from ..inversion.options import add_arguments

    add_arguments(p.add_argument_group("editing"), "edit")


def invert_flags() -> dict[str, str]:
    """Option name → flag of every method's inversion options."""
    from ..inversion.options import cli_flags

    return cli_flags("invert")


def method_options(args: argparse.Namespace, algo, kind: str) -> dict[str, Any]:
    """The method options of ``kind`` (``"invert"`` or ``"edit"``) the user gave, checked
    against what ``algo`` accepts."""
    from ..inversion.options import given_options

    return given_options(vars(args), algo, kind)


def check_skip(algo, options: dict[str, Any], steps: int) -> None:
    """Fail early when the edit would skip all of the inversion's steps."""
    if "skip" not in algo.edit_options:
        return
    skip = options.get("skip", algo.edit_options["skip"])
    if isinstance(skip, int) and skip >= steps:
        given = "" if "skip" in options else f" (default {skip})"
        raise PyinvError(f"--skip{given} must be smaller than the number of steps ({steps})")


def method_flags(algo) -> list[str]:
    """The flags of ``algo``'s own options: its inversion options', then its edit options'."""
    from ..inversion.options import method_flags as flags_of

    return flags_of(algo)


def option_summaries(algo) -> list[str]:
    """One line per option of ``algo``, with its default (``pyinv methods``)."""
    from ..inversion.options import fields_of

    return [field.summary() for field in fields_of(algo)]
