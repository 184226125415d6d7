"""The inversion methods' own flags and how parsed arguments become a method's options.

Everything the command line knows about per-method options is in this module: the
argument definitions (``--form`` and ``--inner-steps`` for the inversion, ``--eta`` and
``--skip`` for the edit), the tables from option name to flag (:data:`INVERT_FLAGS`,
:data:`EDIT_FLAGS`), :func:`method_options` (the options the user gave, checked against
what the method accepts), :func:`check_skip` and :func:`method_flags` (a method's flags, as
``pyinv methods`` lists them).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..argtypes import non_negative_int, positive_int, unit_float
from ..errors import PyinvError

FORMS = ("pinned", "offsets")

#: Method options the command line exposes: API option name → flag.
INVERT_FLAGS = {"form": "--form", "inner_steps": "--inner-steps"}
EDIT_FLAGS = {"eta": "--eta", "skip": "--skip"}


def add_invert_flags(g: Any) -> None:
    """The inversion options of the methods (``--form``, ``--inner-steps``), added to ``g``
    (the ``inversion`` group of ``pyinv edit`` and ``pyinv invert``)."""
    g.add_argument("--form", choices=FORMS, help="direct: pin the source branch (default) or use offsets")
    g.add_argument(
        "--inner-steps",
        type=positive_int,
        metavar="K",
        help="null-text / prompt-tuning: optimisation steps per timestep (default 10)",
    )


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    """The ``editing`` group: the edit options of the methods (``--eta``, ``--skip``)."""
    g = p.add_argument_group("editing")
    g.add_argument("--eta", type=unit_float, help="prompt-tuning: weight of the target prompt, in [0, 1] (default 0.8)")
    g.add_argument(
        "--skip", type=non_negative_int, metavar="K", help="edit-friendly: sampling steps to skip at the start"
    )


def _methods_with(option: str, kind: str) -> str:
    from ..inversion import METHODS

    names = [m.name for m in METHODS.values() if option in (m.invert_options if kind == "invert" else m.edit_options)]
    return ", ".join(names) or "no registered method"


def method_options(args: argparse.Namespace, algo, flags: dict[str, str], kind: str) -> dict[str, Any]:
    """The method options the user gave (``flags``: :data:`INVERT_FLAGS` for ``kind="invert"``,
    :data:`EDIT_FLAGS` for ``"edit"``), checked against what ``algo`` accepts."""
    accepted = algo.invert_options if kind == "invert" else algo.edit_options
    options = {}
    for name, flag in flags.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in accepted:
            raise PyinvError(
                f"{flag} does not apply to method {algo.name!r} (it applies to: {_methods_with(name, kind)})"
            )
        options[name] = value
    return options


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
    flags = [INVERT_FLAGS[o] for o in algo.invert_options if o in INVERT_FLAGS]
    return flags + [EDIT_FLAGS[o] for o in algo.edit_options if o in EDIT_FLAGS]
