"""Reports of ``pyinv benchmark``: the terminal table, markdown and the bar chart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .report import markdown_table, text_table
from .speed import BenchSettings, SpeedRow

COLUMNS = (
    "config", "encode ms", "invert ms", "edit ms", "decode ms", "e2e ms", "IQR ms", "re-edit ms",
    "fwd inv/edit", "ms/fwd", "peak MB", "PSNR dB", "speedup",
)  # fmt: skip


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def row_cells(row: SpeedRow) -> list[str]:
    """One configuration's cells, in :data:`COLUMNS` order."""
    if row.error is not None:
        return [row.label, *(["-"] * (len(COLUMNS) - 2)), f"failed: {row.error}"]
    e2e = row.stages["e2e"]
    return [
        row.label,
        *(_num(row.ms(stage)) for stage in ("encode", "invert", "edit", "decode", "e2e")),
        _num(e2e.q3 - e2e.q1),
        _num(row.ms("reedit")),
        f"{row.invert_forwards}/{row.edit_forwards}",
        _num(row.ms_per_forward, 2),
        _num(row.peak_memory_mb, 0),
        _num(row.psnr_db, 2),
        "baseline" if row.baseline else ("n/a" if row.speedup is None else f"{row.speedup:.2f}x"),
    ]


def settings_line(settings: BenchSettings, device_name: str) -> str:
    steps = settings.steps if settings.steps is not None else "each method's default"
    return (
        f"model {settings.model}, {device_name} ({settings.threads} threads), {settings.resolution}² pixels, "
        f"{steps} steps, {settings.warmup} warm-up + {settings.repeats} timed runs each (median; IQR of e2e)"
    )


def table_lines(rows: Sequence[SpeedRow], settings: BenchSettings, device_name: str) -> list[str]:
    """A fixed-width table for the terminal, the settings above it."""
    return [settings_line(settings, device_name), *text_table([list(COLUMNS), *(row_cells(r) for r in rows)])]


def target_lines(targets: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for t in targets:
        value = f"{t['value_x']:.2f}x" if "value_x" in t else f"{t['value_s']:.3f} s"
        out.append(f"target: {t['target']}: {value} ({t['config']}) - {'met' if t['met'] else 'not met'}")
    return out


def markdown_lines(
    rows: Sequence[SpeedRow], settings: BenchSettings, device_name: str, targets: Sequence[dict[str, Any]]
) -> list[str]:
    lines = ["# pyinv benchmark", "", settings_line(settings, device_name), ""]
    lines += markdown_table([list(COLUMNS), *(row_cells(r) for r in rows)])
    lines += ["", *(f"- {line}" for line in target_lines(targets))]
    lines += [
        "",
        "Stages in milliseconds (median of the timed runs). e2e = encode + invert + edit + decode in one go;",
        "re-edit = edit + decode from an inversion already made. fwd = UNet image-forwards (a batch of n rows",
        "counts n). ms/fwd = (invert + edit) / forwards. PSNR: the method's reconstruction of the input.",
        "Speedup: the baseline's e2e over the configuration's.",
    ]
    return lines


def plot(rows: Sequence[SpeedRow], path: str, title: str) -> None:
    """A PNG bar chart of end-to-end time per configuration (IQR as error bars), the
    baseline in its own colour and labelled. Written atomically; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import PyinvError

        raise PyinvError("--plot needs matplotlib (pip install matplotlib)") from None
    from ..imageio import atomic_path

    done = [r for r in rows if r.error is None]
    labels = [r.label for r in done]
    e2e = [r.stages["e2e"] for r in done]
    values = [s.median / 1e3 for s in e2e]
    errors = [[(s.median - s.q1) / 1e3 for s in e2e], [(s.q3 - s.median) / 1e3 for s in e2e]]
    colours = ["#c0392b" if r.baseline else "#2e86c1" for r in done]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(done) + 1.6))
    ax.barh(range(len(done)), values, xerr=errors, color=colours, capsize=3)
    ax.set_yticks(range(len(done)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("end-to-end seconds per edit (encode + invert + edit + decode)")
    ax.set_title(title)
    for k, row in enumerate(done):
        note = "baseline" if row.baseline else (f"{row.speedup:.1f}x" if row.speedup else "")
        ax.text(values[k], k, f"  {note}", va="center")
    ax.set_xlim(0, max(values, default=1) * 1.25)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
