"""argparse types of the command line: numbers checked at parse time, with one-line messages."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str, out_of_range: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {out_of_range}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer", "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer", "a non-negative integer")
non_negative_float = _checked(
    float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number", "a finite non-negative number"
)
unit_float = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "a number in [0, 1]")
