"""``pyinv benchmark``: the matrix, the stage timings' bookkeeping, the reports and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pyinv.bench import speed
from pyinv.bench.speed_report import COLUMNS, markdown_lines, row_cells, table_lines
from pyinv.cli import main as run
from pyinv.errors import PyinvError


# ---------------------------------------------------------------------- the matrix
def test_matrix_defaults_baseline_first_and_edict_without_control():
    configs = speed.matrix()
    assert configs[0] == speed.BASELINE and configs[0].baseline
    assert [c.method for c in configs[1:]] == ["direct", "ddim", "negative-prompt", "edit-friendly"]
    assert all(c.control == "p2p" and c.backend == "eager" and c.dtype == "fp32" for c in configs)
    assert [c.method for c in speed.matrix(quick=True)] == ["null-text", "direct", "ddim"]
    assert speed.matrix(["edict"])[1] == speed.SpeedConfig("edict", "none")
    with pytest.raises(PyinvError, match="takes no attention control"):
        speed.matrix(["edict"], ["p2p"])
    grid = speed.matrix(["direct"], ["p2p", "none"], ["eager", "compile"], ["fp32", "bf16"], baseline=False)
    assert len(grid) == 8 and not any(c.baseline for c in grid)
    # the baseline is not repeated when it is also asked for
    assert speed.matrix(["null-text"], ["p2p"]).count(speed.BASELINE) == 1
    for bad in ({"controls": ["blend"]}, {"backends": ["tensorrt9"]}, {"dtypes": ["fp8"]}):
        with pytest.raises(PyinvError, match="unknown"):
            speed.matrix(["direct"], **bad)


def test_spread_median_and_quartiles():
    s = speed.Spread.of([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (s.median, s.q1, s.q3) == pytest.approx((3.0, 2.0, 4.0))
    one = speed.Spread.of([0.0025])
    assert one.median == one.q1 == one.q3 == pytest.approx(2.5)


# ---------------------------------------------------------------------- the stage-wise API
def test_stagewise_api_equals_the_one_call_api(editor):
    image = speed.source_image(editor.model.image_size)
    whole = editor.invert(image, speed.SOURCE_PROMPT, method="direct", steps=3)
    z0 = editor.encode(image)
    staged = editor.invert_latents(z0, speed.SOURCE_PROMPT, method="direct", steps=3)
    for name, tensor in whole.tensors.items():
        assert torch.equal(tensor, staged.tensors[name]), name
    control = speed.controller("p2p", False)
    out = editor.edit(whole, speed.TARGET_PROMPT, control=control)
    latents = editor.edit_latents(staged, speed.TARGET_PROMPT, control=speed.controller("p2p", False))
    assert torch.equal(out.latents, latents.targets) and out.unet_image_forwards == latents.unet_image_forwards
    assert np.array_equal(np.asarray(editor.decode(latents.targets)[0]), np.asarray(out.images[0]))
    with pytest.raises(PyinvError, match="no edit option"):
        editor.edit_latents(staged, speed.TARGET_PROMPT, eta=0.5)
    with pytest.raises(PyinvError, match="target prompt"):
        editor.edit_latents(staged, "")


# ---------------------------------------------------------------------- one configuration
@pytest.fixture(scope="module")
def rows(editor):
    """Baseline, Direct + P2P and DDIM + prompt swap on the tiny model, 3 steps, 1 run each."""
    settings = speed.BenchSettings("tiny", "cpu", editor.model.image_size, steps=3, warmup=0, repeats=1)
    configs = [speed.BASELINE, speed.SpeedConfig("direct", "p2p"), speed.SpeedConfig("ddim", "none")]
    rows, interrupted = speed.run_bench(lambda dtype, backend: editor, configs, settings, progress=False)
    assert not interrupted
    return rows


class ClockedEditor:
    """The tiny editor on a fake clock: in run ``r`` (0 = the warm-up) stage ``s`` advances
    the clock by ``BASE_MS[s] · SCALE[r]`` milliseconds, so every timing is known exactly."""

    BASE_MS = {"encode": 1.0, "invert": 10.0, "edit": 100.0, "decode": 1000.0}
    SCALE = (50.0, 1.0, 2.0, 3.0)

    def __init__(self, editor):
        self.editor, self.now, self.run = editor, 0.0, -1

    def perf_counter(self) -> float:
        return self.now

    def _advance(self, stage: str) -> None:
        self.now += 1e-3 * self.BASE_MS[stage] * self.SCALE[self.run]

    def __getattr__(self, name):
        return getattr(self.editor, name)

    def encode(self, image):
        self.run += 1
        self._advance("encode")
        return self.editor.encode(image)

    def invert_latents(self, *args, **kwargs):
        self._advance("invert")
        return self.editor.invert_latents(*args, **kwargs)

    def edit_latents(self, *args, **kwargs):
        self._advance("edit")
        return self.editor.edit_latents(*args, **kwargs)

    def decode(self, latents):
        self._advance("decode")
        return self.editor.decode(latents)


def test_each_stage_times_its_own_call_and_warmup_is_left_out(editor, monkeypatch):
    """Timed runs ×1, ×2, ×3 of the base times (inclusive quartiles ×1.5, ×2, ×2.5); the
    warm-up (×50) must not count. e2e spans the four stages, re-edit the last two."""
    clocked = ClockedEditor(editor)
    monkeypatch.setattr(speed, "time", clocked)  # speed.py reads only time.perf_counter
    settings = speed.BenchSettings("tiny", "cpu", editor.model.image_size, steps=2, warmup=1, repeats=3)
    row = speed.run_config(clocked, speed.SpeedConfig("ddim", "none"), settings)
    assert clocked.run == 3
    base = dict(clocked.BASE_MS)
    base["e2e"] = sum(clocked.BASE_MS.values())
    base["reedit"] = base["edit"] + base["decode"]
    for stage in speed.STAGES:
        spread = row.stages[stage]
        assert (spread.q1, spread.median, spread.q3) == pytest.approx(
            (1.5 * base[stage], 2 * base[stage], 2.5 * base[stage])
        ), stage
    assert row.ms_per_forward == pytest.approx((row.ms("invert") + row.ms("edit")) / (2 + 2 * 2))


def test_forward_counts_and_derived_columns(rows):
    baseline, direct, ddim = rows
    # Direct Inversion: 3 DDIM-inversion forwards; its P2P edit pins the source (3 rows a step)
    assert (direct.invert_forwards, direct.edit_forwards) == (3, 9)
    # DDIM prompt swap: the target branch only, with CFG (2 rows a step)
    assert (ddim.invert_forwards, ddim.edit_forwards) == (3, 6)
    # NTI: DDIM inversion plus optimisation forwards; its P2P edit runs 4 rows a step
    assert baseline.invert_forwards > 3 and baseline.edit_forwards == 12
    for row in rows:
        forwards = row.invert_forwards + row.edit_forwards
        assert row.ms_per_forward == pytest.approx((row.ms("invert") + row.ms("edit")) / forwards)
        assert row.peak_memory_mb > 0 and row.peak_memory_kind
        assert math.isfinite(row.psnr_db) or row.psnr_db == math.inf
        assert row.speedup == pytest.approx(baseline.ms("e2e") / row.ms("e2e"))
    assert baseline.speedup == pytest.approx(1.0)


def test_reports_have_every_column(rows):
    settings = speed.BenchSettings("tiny", "cpu", 32, steps=3, warmup=0, repeats=1)
    lines = table_lines(rows, settings, "cpu")
    assert all(name in lines[1] for name in COLUMNS)
    assert len(lines) == 3 + len(rows)
    for row in rows:
        assert len(row_cells(row)) == len(COLUMNS)
    md = markdown_lines(rows, settings, "cpu", speed.targets(rows, "cpu"))
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + len(rows) and all(line.count("|") == len(COLUMNS) + 1 for line in table)


def test_targets_are_reported_not_asserted():
    def row(method, control, e2e_ms, reedit_ms=None, speedup=None, baseline=False):
        r = speed.SpeedRow(f"{method}+{control}", method, control, "eager", "fp32", baseline, speedup=speedup)
        r.stages = {"e2e": speed.Spread(e2e_ms, e2e_ms, e2e_ms), "reedit": speed.Spread(reedit_ms or 0, 0, 0)}
        return r

    rows = [row("null-text", "p2p", 900.0, speedup=1.0, baseline=True), row("direct", "p2p", 100.0, speedup=9.0)]
    (cpu,) = speed.targets(rows, "cpu")
    assert cpu["met"] and cpu["value_x"] == 9.0
    rows[1].speedup = 7.9
    assert not speed.targets(rows, "cpu")[0]["met"]
    rows[1].stages["e2e"] = speed.Spread(1200.0, 1200.0, 1200.0)
    rows[1].stages["reedit"] = speed.Spread(500.0, 500.0, 500.0)
    e2e, reedit = speed.targets(rows, "cuda")
    assert not e2e["met"] and e2e["value_s"] == pytest.approx(1.2)
    assert reedit["met"] and reedit["value_s"] == pytest.approx(0.5)
    assert speed.targets(rows[:1], "cpu") == []
    # the CPU target is at fp32: a faster bf16 row does not count, the fastest fp32 backend does
    fast_bf16 = row("direct", "p2p", 50.0, speedup=18.0)
    fast_bf16.dtype = "bf16"
    compiled = row("direct", "p2p", 90.0, speedup=10.0)
    compiled.backend = "compile"
    (cpu,) = speed.targets([*rows, fast_bf16, compiled], "cpu")
    assert cpu["value_x"] == 10.0 and cpu["config"] == compiled.label


def test_a_failing_configuration_is_reported_not_dropped(editor):
    settings = speed.BenchSettings("tiny", "cpu", 32, steps=2, warmup=0, repeats=1)

    def load(dtype, backend):
        if dtype == "bf16":
            raise PyinvError("no bf16 here")
        return editor

    configs = [speed.SpeedConfig("direct", "none"), speed.SpeedConfig("direct", "none", dtype="bf16")]
    (ok, failed), _ = speed.run_bench(load, configs, settings, progress=False)
    assert ok.error is None and ok.speedup is None  # no baseline in this run
    assert failed.error == "no bf16 here" and failed.stages == {}
    assert row_cells(failed)[-1] == "failed: no bf16 here"


def test_compile_backend_shares_weights_and_keeps_results(editor, monkeypatch):
    """``compile`` runs the UNet on the compile backend (torch.compile, weights shared); traced
    here with the cheap aot_eager backend, the edit equals the eager one."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="aot_eager", **kw))
    compiled = speed.with_backend(editor, "compile")
    assert compiled.model.backend.name == "compile" and compiled.model.traced_unet
    assert compiled.model.unet is editor.model.unet and editor.model.backend.name == "eager"
    runner = compiled.model.backend.runner(compiled.model.unet)
    assert next(runner.parameters()) is next(editor.model.unet.parameters())
    assert speed.with_backend(editor, "eager") is editor
    settings = speed.BenchSettings("tiny", "cpu", 32, steps=2, warmup=0, repeats=1)
    torch._dynamo.reset()
    row = speed.run_config(compiled, speed.SpeedConfig("direct", "p2p", "compile"), settings)
    assert row.error is None and row.edit_forwards == 6
    z0 = editor.encode(speed.source_image(editor.model.image_size))
    inv = editor.invert_latents(z0, speed.SOURCE_PROMPT, method="direct", steps=2)
    eager = editor.edit_latents(inv, speed.TARGET_PROMPT, control=speed.controller("p2p", True)).targets
    traced = compiled.edit_latents(inv, speed.TARGET_PROMPT, control=speed.controller("p2p", True)).targets
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_an_interrupted_run_reports_what_it_measured(editor, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second configuration: the first is reported, the rest marked."""
    real = speed.run_config
    calls = []

    def run_config(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "run_config", run_config)
    path = tmp_path / "partial.json"
    argv = ["benchmark", "--model", "tiny", "--method", "direct", "--method", "ddim", "--steps", "2",
            "--warmup", "0", "--repeats", "1", "-q", "--json", str(path)]  # fmt: skip
    assert run(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    rows = json.loads(path.read_text())["rows"]
    assert [r["error"] for r in rows] == [None, "interrupted", "interrupted"]
    assert rows[0]["baseline"] and rows[0]["stages"]["e2e"]["median"] > 0
    assert len(calls) == 2  # nothing ran after the interrupt


# ---------------------------------------------------------------------- the command
def test_benchmark_command_writes_json_markdown_and_plot(tmp_path, capsys):
    paths = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "md", "png")}
    argv = [
        "benchmark", "--model", "tiny", "--method", "direct", "--control", "p2p", "--control", "none",
        "--steps", "2", "--warmup", "0", "--repeats", "2", "-q",
        "--json", str(paths["json"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"]),
    ]  # fmt: skip
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "null-text+p2p eager fp32 (baseline)" in out and "direct+none eager fp32" in out
    report = json.loads(paths["json"].read_text())
    assert report["benchmark"] == "speed" and report["device"] == "cpu" and "commit" in report
    assert report["settings"]["steps"] == 2 and report["settings"]["repeats"] == 2
    assert report["versions"]["torch"] == torch.__version__
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["null-text+p2p eager fp32 (baseline)", "direct+p2p eager fp32", "direct+none eager fp32"]
    for r in report["rows"]:
        assert set(r["stages"]) == set(speed.STAGES)
        for key in ("invert_forwards", "edit_forwards", "ms_per_forward", "peak_memory_mb", "speedup"):
            assert isinstance(r[key], (int, float)), key
    assert isinstance(report["targets"], list) and report["targets"][0]["config"] == "direct+p2p eager fp32"
    md = paths["md"].read_text()
    assert all(name in md for name in COLUMNS) and "direct+none eager fp32" in md
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_benchmark_command_user_errors_are_one_line(tmp_path, capsys):
    assert run(["benchmark", "--model", "tiny", "--method", "nonsense", "-q"]) != 0
    err = capsys.readouterr().err
    assert "nonsense" in err and "Traceback" not in err
    assert run(["benchmark", "--model", "tiny", "--method", "edict", "--control", "p2p", "-q"]) != 0
    assert "takes no attention control" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "dir" / "b.json"
    assert run(["benchmark", "--model", "tiny", "--json", str(missing), "-q"]) != 0
    assert "Traceback" not in capsys.readouterr().err
