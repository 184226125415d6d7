"""Atomic writing of benchmark reports (JSON, markdown) and their text and markdown tables.

A report's provenance block (versions, device, commit) comes from :func:`pyinv.provenance.provenance`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ..imageio import atomic_path


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


def text_table(cells: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A fixed-width text table: ``cells[0]`` is the header (underlined), the first ``left``
    columns are left-aligned and the rest right-aligned."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    out = []
    for n, line in enumerate(cells):
        out.append(
            "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def markdown_table(cells: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """The same table in markdown: ``cells[0]`` is the header; columns after the first
    ``left`` are right-aligned."""
    rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(cells[0]))) + "|"
    return ["| " + " | ".join(cells[0]) + " |", rule, *("| " + " | ".join(line) + " |" for line in cells[1:])]
