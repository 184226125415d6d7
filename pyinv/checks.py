"""Range checks of plain numbers that users give: seeds and guidance scales.

One home for each bound, shared by the Python API (which raises :class:`PyinvError`) and
the command line's argument types (which turn the same message into a usage error).

- A seed is an integer in ``[0, 2**64 − 1]``, the range torch's generators take; a run of
  ``count`` seeds ``seed … seed + count − 1`` must stay inside it.
- A text (a prompt) is a ``str`` that encodes as UTF-8 (a command line's undecodable bytes
  arrive as lone surrogates, which the tokenizer cannot take).
- A guidance scale is a finite number in ``[0, MAX_GUIDANCE]``. The papers edit with 1–15
  (7.5 most often); far larger scales saturate the image and then overflow (``1e20`` gave
  an all-black "result"), so they are refused before any work is done.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import PyinvError

SEED_MAX = 2**64 - 1
MAX_GUIDANCE = 50.0


def check_seed(seed: Any, what: str = "seed", count: int = 1) -> int:
    """``seed`` as an int, checked so that ``seed … seed + count − 1`` are valid seeds."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise PyinvError(f"{what} must be an integer, got {seed!r}")
    value = int(seed)
    if value < 0:
        raise PyinvError(f"{what} must be a non-negative integer, got {value}")
    if value + count - 1 > SEED_MAX:
        if count > 1:
            raise PyinvError(
                f"{what} {value} with {count} images goes past the largest seed 2**64-1 "
                f"(use a seed of at most {SEED_MAX - count + 1})"
            )
        raise PyinvError(f"{what} must be at most 2**64-1 ({SEED_MAX}), got {value}")
    return value


def check_guidance(guidance: Any, what: str = "guidance") -> float:
    """``guidance`` as a float in ``[0, MAX_GUIDANCE]``."""
    if isinstance(guidance, bool):
        raise PyinvError(f"{what} must be a number, got {guidance!r}")
    try:
        value = float(guidance)
    except (TypeError, ValueError, OverflowError):
        raise PyinvError(f"{what} must be a number, got {guidance!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= MAX_GUIDANCE:
        raise PyinvError(f"{what} must be a number in [0, {MAX_GUIDANCE:g}], got {guidance}")
    return value


def check_text(text: Any, what: str = "prompt") -> str:
    """``text`` when it is a string the tokenizer can take (valid Unicode), else a clear error."""
    if not isinstance(text, str):
        raise PyinvError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PyinvError(f"{what} is not valid text (it holds bytes that are not UTF-8): {text!r}") from None
    return text
