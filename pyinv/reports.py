"""Report files, written atomically: a reader never sees half a report, and a failed write
leaves any earlier file in place (:func:`pyinv.imageio.atomic_path`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .imageio import atomic_path


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(payload), f, indent=2)
        f.write("\n")


def write_text(path: str, lines: Sequence[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
