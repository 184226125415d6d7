"""argparse types of the command line: numbers checked at parse time, with one-line messages.

Bounds shared with the Python API (seeds, guidance) come from :mod:`pyinv.checks`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from .checks import check_guidance, check_seed
from .errors import PyinvError

#: most images one ``pyinv generate --count`` samples (they run as one batch)
MAX_COUNT = 100


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str, out_of_range: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {out_of_range}, got {text!r}")
        return value

    return parse


def _from_check(convert: Callable[[str], object], check: Callable[[object], object], expected: str):
    """An argparse type: ``convert`` the text, then the API's own ``check`` (its message)."""

    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except PyinvError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer", "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer", "a non-negative integer")
non_negative_float = _checked(
    float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number", "a finite non-negative number"
)
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number", "a finite positive number")
unit_float = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "a number in [0, 1]")


def int_in(low: int, high: int):
    """An argparse type: an integer in ``[low, high]`` (bounds that keep a run's size sane)."""
    return _checked(int, lambda v: low <= v <= high, "an integer", f"an integer in [{low}, {high}]")


count_arg = int_in(1, MAX_COUNT)
seed_arg = _from_check(int, check_seed, "an integer seed")
guidance_arg = _from_check(float, check_guidance, "a number")
