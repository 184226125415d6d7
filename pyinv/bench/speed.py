"""Latency of inversion + editing configurations, against the NTI + P2P baseline.

One configuration is an inversion method × attention control × backend × dtype. Each
runs ``warmup + repeats`` times on the same image and prompts (a shapes-world render, "a
red circle on a blue background" → "… green …"), timing five stages with the device
synchronised at every boundary:

- ``encode``: image → latents ``z0`` (VAE encoder; a no-op for pixel-space models);
- ``invert``: the method's inversion from ``z0`` (its UNet work, NTI/PTI optimisation);
- ``edit``: the edit of the cached inversion (attention control included), latents only;
- ``decode``: latents → image;
- ``e2e``: all four, one call after the other (the wall time of one full edit);
- ``reedit``: ``edit + decode`` — the time to edit again from an inversion already made
  (invert once, edit many).

Each is reported as the median and the interquartile range of the repeats. Also per
configuration: the UNet image-forwards of the inversion and of the edit (a batch of n
rows counts n; NTI's optimisation forwards included) and ``ms_per_forward = (invert + edit)
/ forwards``; the peak memory of the timed runs (CUDA: ``max_memory_allocated``; CPU: the
process's peak resident set, reset before the runs where Linux allows); the PSNR of the
method's reconstruction of the source against the input image (a sanity column, computed
outside the timed runs); and the speedup ``e2e(baseline) / e2e(config)``.

The baseline is NTI + P2P in its reference configuration: fp32, eager, 10 inner steps
with early stopping (``null-text`` with its defaults), measured in the same run on the same
machine and inputs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..backends import BACKENDS as UNET_BACKENDS
from ..errors import PyinvError

BACKENDS = tuple(UNET_BACKENDS)  # the benchmark's backend axis
DTYPE_NAMES = ("fp32", "fp16", "bf16")
STAGES = ("encode", "invert", "edit", "decode", "e2e", "reedit")
#: methods of the default matrix (each with P2P; prompt swap for methods without control)
DEFAULT_METHODS = ("direct", "ddim", "negative-prompt", "edit-friendly")
QUICK_METHODS = ("direct", "ddim")

SOURCE_PROMPT = "a red circle on a blue background"
TARGET_PROMPT = "a green circle on a blue background"
EDIT_WORDS = ("red", "green")


@dataclass(frozen=True)
class SpeedConfig:
    """One configuration: ``method`` (canonical name), ``control``, ``backend``, ``dtype``."""

    method: str
    control: str
    backend: str = "eager"
    dtype: str = "fp32"
    baseline: bool = False

    @property
    def label(self) -> str:
        text = f"{self.method}+{self.control} {self.backend} {self.dtype}"
        return text + " (baseline)" if self.baseline else text


#: NTI + P2P as the references run it
BASELINE = SpeedConfig("null-text", "p2p", "eager", "fp32", baseline=True)


@dataclass
class BenchSettings:
    """What every configuration shares."""

    model: str
    device: str
    resolution: int
    steps: int | None  # None: each method's default (50 for all but EDICT/EF-DDPM's own)
    warmup: int = 1
    repeats: int = 3
    threads: int = field(default_factory=torch.get_num_threads)


@dataclass
class Spread:
    """Median and interquartile range of a stage's times, in milliseconds."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Spread:
        ms = sorted(1e3 * s for s in seconds)
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0])
        q = statistics.quantiles(ms, n=4, method="inclusive")
        return cls(statistics.median(ms), q[0], q[2])


@dataclass
class SpeedRow:
    """The measurements of one configuration (``error`` set when it could not run)."""

    label: str
    method: str
    control: str
    backend: str
    dtype: str
    baseline: bool
    steps: int | None = None
    stages: dict[str, Spread] = field(default_factory=dict)
    invert_forwards: int | None = None
    edit_forwards: int | None = None
    ms_per_forward: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str = ""
    psnr_db: float | None = None
    speedup: float | None = None
    error: str | None = None

    def ms(self, stage: str) -> float | None:
        return self.stages[stage].median if stage in self.stages else None


# ---------------------------------------------------------------------- the matrix
def matrix(
    methods: Sequence[str] | None = None,
    controls: Sequence[str] | None = None,
    backends: Sequence[str] = ("eager",),
    dtypes: Sequence[str] = ("fp32",),
    baseline: bool = True,
    quick: bool = False,
) -> list[SpeedConfig]:
    """Configurations: every method × control × backend × dtype, the baseline first.

    Methods that take no attention control (EDICT) run with ``none``; naming such a method
    with a control explicitly is an error. Default: :data:`DEFAULT_METHODS` (``--quick``:
    :data:`QUICK_METHODS`) with P2P.
    """
    from ..control.registry import CONTROL_NAMES, DEFAULT_CONTROL, NONE
    from ..inversion import get_method

    for what, values, allowed in (("control", controls, CONTROL_NAMES), ("backend", backends, BACKENDS)):
        for value in values or ():
            if value not in allowed:
                raise PyinvError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    for name in dtypes:
        if name not in DTYPE_NAMES:
            raise PyinvError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    names = methods or (QUICK_METHODS if quick else DEFAULT_METHODS)
    configs = [BASELINE] if baseline else []
    for name in names:
        algo = get_method(name)
        for control in controls or (DEFAULT_CONTROL,):
            if not algo.takes_control and control != NONE:
                if controls:
                    raise PyinvError(f"method {algo.name!r} takes no attention control; use --control none")
                control = NONE
            for backend in backends:
                for dtype in dtypes:
                    configs.append(SpeedConfig(algo.name, control, backend, dtype))
    return list(dict.fromkeys(configs))


def controller(control: str, compiled: bool):
    """The attention controller of ``control`` in the benchmarks' settings on the edited words
    (``None`` for prompt swap). Under a compiled UNet the controllers keep one graph for
    every step (``graph_static``)."""
    from ..control.registry import benchmark_controller

    return benchmark_controller(control, EDIT_WORDS, graph_static=compiled)


def source_image(resolution: int):
    """The benchmark's input: a red circle on a blue background, ``resolution`` pixels."""
    from ..shapes.world import Scene, render

    return render(Scene("circle", "red", "blue", center=(0.45, 0.55), size=0.28), side=resolution)


def with_backend(editor, backend: str):
    """An editor whose UNet runs on ``backend`` (:mod:`pyinv.backends`; the weights are shared,
    not copied); ``eager`` is the editor as loaded."""
    if backend == "eager":
        return editor
    from ..api import Editor
    from ..backends import get_backend

    model = replace(editor.model, backend=get_backend(backend))
    model.reset_counters()
    return Editor(model, progress=editor.progress)


# ---------------------------------------------------------------------- memory
def _reset_peak(device: torch.device) -> str:
    """Reset the peak-memory counter for ``device``; the kind of peak that will be read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max allocated"
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "peak RSS"
    except OSError:
        return "process peak RSS (since start)"


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


# ---------------------------------------------------------------------- running
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(
    editor, config: SpeedConfig, settings: BenchSettings, tick: Callable[[], None] | None = None
) -> SpeedRow:
    """Time ``config`` on ``editor`` (already on the config's dtype and backend)."""
    from ..inversion import get_method
    from .metrics import masked_psnr, to_unit_tensor

    algo = get_method(config.method)
    steps = settings.steps or algo.steps_for(editor.model)
    row = SpeedRow(config.label, config.method, config.control, config.backend, config.dtype, config.baseline, steps)
    device = editor.model.device
    image = source_image(editor.model.image_size)
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    inv = out = None
    for i in range(settings.warmup + settings.repeats):
        if i == settings.warmup:
            row.peak_memory_kind = _reset_peak(device)
        control = controller(config.control, editor.model.traced_unet)
        _sync(device)
        t0 = time.perf_counter()
        z0 = editor.encode(image)
        _sync(device)
        t1 = time.perf_counter()
        inv = editor.invert_latents(z0, SOURCE_PROMPT, method=config.method, steps=steps)
        _sync(device)
        t2 = time.perf_counter()
        out = editor.edit_latents(inv, TARGET_PROMPT, control=control)
        _sync(device)
        t3 = time.perf_counter()
        editor.decode(out.targets)
        _sync(device)
        t4 = time.perf_counter()
        if i >= settings.warmup:
            for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, t4 - t2), strict=True):
                samples[stage].append(seconds)
        if tick is not None:
            tick()
    row.peak_memory_mb = _peak_mb(device)
    row.stages = {stage: Spread.of(values) for stage, values in samples.items()}
    row.invert_forwards = int(inv.stats["unet_image_forwards"])
    row.edit_forwards = int(out.unet_image_forwards)
    forwards = row.invert_forwards + row.edit_forwards
    if forwards:
        row.ms_per_forward = (row.ms("invert") + row.ms("edit")) / forwards
    rec = editor.reconstruct(inv).source_image  # the image was rendered at the model's size
    row.psnr_db = float(masked_psnr(to_unit_tensor(rec), to_unit_tensor(image))[0])
    return row


def _failed(config: SpeedConfig, message: str) -> SpeedRow:
    return SpeedRow(
        config.label, config.method, config.control, config.backend, config.dtype, config.baseline, error=message
    )


def run_bench(
    load: Callable[[str, str], Any],
    configs: Sequence[SpeedConfig],
    settings: BenchSettings,
    progress: bool = True,
) -> tuple[list[SpeedRow], bool]:
    """Run every configuration; ``load(dtype, backend)`` gives the editor for a pair (the
    caller caches). Returns the rows and whether the run was interrupted (Ctrl-C): then the
    configurations not finished are rows with the error ``interrupted``, so what was measured
    is still reported. A configuration that fails is reported with its error, not dropped."""
    from tqdm.auto import tqdm

    rows: list[SpeedRow] = []
    interrupted = False
    total = len(configs) * (settings.warmup + settings.repeats)
    with tqdm(total=total, desc="benchmark", unit="run", disable=not progress, leave=False) as bar:
        for config in configs:
            if interrupted:
                rows.append(_failed(config, "interrupted"))
                continue
            bar.set_postfix_str(config.label)
            try:
                editor = load(config.dtype, config.backend)
                rows.append(run_config(editor, config, settings, tick=lambda: bar.update(1)))
            except (PyinvError, RuntimeError, ValueError) as exc:
                rows.append(_failed(config, " ".join(str(exc).split()) or type(exc).__name__))
                bar.update(settings.warmup + settings.repeats)
            except KeyboardInterrupt:
                interrupted = True
                rows.append(_failed(config, "interrupted"))
    baseline = next((r for r in rows if r.baseline and r.error is None), None)
    for row in rows:
        if baseline is not None and row.error is None and row.ms("e2e"):
            row.speedup = baseline.ms("e2e") / row.ms("e2e")
    return rows, interrupted


# ---------------------------------------------------------------------- targets
def targets(rows: Sequence[SpeedRow], device_type: str) -> list[dict[str, Any]]:
    """The latency targets, as measured (never asserted): on the CPU, Direct Inversion + P2P
    end to end ≥ 8× faster than the baseline at fp32, on the fastest backend; on CUDA,
    Direct + P2P end to end ≤ 1.0 s and re-edit ≤ 0.6 s (stated for SD 1.5 at 512², 50
    steps, fp16)."""
    direct = [r for r in rows if r.method == "direct" and r.control == "p2p" and r.error is None]
    if not direct:
        return []
    best = min(direct, key=lambda r: r.ms("e2e"))
    if device_type == "cuda":
        return [
            {"target": "Direct + P2P end to end <= 1.0 s", "config": best.label,
             "value_s": best.ms("e2e") / 1e3, "met": best.ms("e2e") <= 1000.0},
            {"target": "re-edit from a cached inversion <= 0.6 s", "config": best.label,
             "value_s": best.ms("reedit") / 1e3, "met": best.ms("reedit") <= 600.0},
        ]  # fmt: skip
    fp32 = [r for r in direct if r.dtype == "fp32" and r.speedup is not None]
    if not fp32:
        return []
    best = max(fp32, key=lambda r: r.speedup)
    return [
        {"target": "Direct + P2P end to end >= 8x faster than NTI + P2P at fp32", "config": best.label,
         "value_x": best.speedup, "met": best.speedup >= 8.0}
    ]  # fmt: skip
