"""The text and markdown tables of benchmark reports.

Reports are written with :mod:`pyinv.reports` (atomic JSON and text files); their provenance
block (versions, device, commit) comes from :func:`pyinv.provenance.provenance`.
"""

from __future__ import annotations

from collections.abc import Sequence


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
