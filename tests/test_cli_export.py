"""``pyinv export`` on the tiny model: the graphs of two layouts are built into a fresh
``--cache-dir``, a second run finds them all cached, an edit afterwards on the same cache
exports nothing; user mistakes are one-line usage errors that write nothing."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
from conftest import make_test_image

import pyinv
from pyinv import cli
from pyinv.backends import BACKENDS, Backend, OnnxRuntimeBackend
from pyinv.backends.cache import ExportCache
from pyinv.cli import export
from pyinv.inversion import get_method

pytestmark = [
    pytest.mark.usefixtures("tiny_cli_default"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnxscript")),
        reason="the onnxruntime backend needs pyinv[export]",
    ),
]

LAYOUTS = ["direct+p2p", "direct"]  # P2P's edit, and a prompt swap
GRAPHS = {
    ("direct+p2p", "R=1 16×16 plain"),  # the inversion
    ("direct+p2p", "R=3 16×16 p2p(cross,self)"),  # the edit: source row, target's two passes
    ("direct", "R=2 16×16 plain"),  # the prompt swap: the target's two passes
}


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_cli_default):
    """The first export into an empty cache: ``(cache dir, status, stdout, stderr, report)``."""
    base = tmp_path_factory.mktemp("export")
    cache = base / "exports"
    report = base / "first.json"
    status, out, err = run(["export", "--cache-dir", str(cache), "--layouts", *LAYOUTS, "--json", str(report)])
    return cache, status, out, err, json.loads(report.read_text()) if report.exists() else None


def test_the_first_run_builds_every_graph(first):
    cache, status, out, err, report = first
    assert status == 0, err
    assert {(g["layout"], g["signature"]) for g in report["graphs"]} == GRAPHS
    assert {g["status"] for g in report["graphs"]} == {"built"}
    assert all(g["seconds"] > 0 and g["size_bytes"] > 0 for g in report["graphs"])
    assert report["totals"]["graphs"] == report["totals"]["built"] == 3 and report["totals"]["cached"] == 0
    assert report["totals"]["size_bytes"] == sum(g["size_bytes"] for g in report["graphs"])
    assert [r["layout"] for r in report["layouts"]] == LAYOUTS
    assert [r["steps"] for r in report["layouts"]] == [3, 2]  # P2P's self window needs 3 steps
    assert report["cache"] == str(cache) and report["model"] == "tiny" and report["resolution"] == 32
    assert sorted(g["path"] for g in report["graphs"]) == [str(p) for p in ExportCache(cache).entries()]
    # the table: a header, a line per graph, the totals
    lines = out.splitlines()
    assert lines[0].startswith("pyinv export: model tiny, onnxruntime, cpu float32, 32² pixels")
    for layout, signature in GRAPHS:
        assert any(line.startswith(layout + " ") and signature in line and "built" in line for line in lines)
    assert "3 graphs: 3 built, 0 already cached" in lines[-1]
    assert "2/2" in err and "Traceback" not in err  # the progress bar, one tick per layout


def test_a_second_run_finds_them_all_cached(first, tmp_path):
    cache, status, *_, before = first
    assert status == 0
    stamps = mtimes(cache)
    report = tmp_path / "second.json"
    status, out, err = run(["export", "--cache-dir", str(cache), "--layouts", *LAYOUTS, "--json", str(report)])
    assert status == 0, err
    again = json.loads(report.read_text())
    assert again["totals"]["built"] == 0 and again["totals"]["cached"] == 3
    assert {g["status"] for g in again["graphs"]} == {"cached"}
    assert {(g["layout"], g["signature"], g["path"]) for g in again["graphs"]} == {
        (g["layout"], g["signature"], g["path"]) for g in before["graphs"]
    }
    assert "3 graphs: 0 built, 3 already cached" in out
    assert mtimes(cache) == stamps  # nothing rewritten
    # quiet: nothing printed
    assert run(["export", "--cache-dir", str(cache), "--layouts", *LAYOUTS, "-q"]) == (0, "", "")
    assert mtimes(cache) == stamps


def test_edits_afterwards_export_nothing(first, tmp_path, monkeypatch):
    cache, status, *_ = first
    assert status == 0
    stamps = mtimes(cache)
    backend = OnnxRuntimeBackend(cache=cache)
    editor = pyinv.Editor.from_pretrained("tiny", backend=backend)
    inv = editor.invert(make_test_image(40), "a photo of a red ball", method="direct", steps=10, seed=1)
    editor.edit(inv, "a photo of a blue cube", control=pyinv.P2P())
    editor.edit(inv, "a photo of a blue cube", control=None)
    assert backend.built == []
    assert {s.describe() for s, _ in backend.found} == {signature for _, signature in GRAPHS}
    # the command line reads $PYINV_CACHE_DIR/exports, the default --cache-dir
    monkeypatch.setenv("PYINV_CACHE_DIR", str(cache.parent))
    image = tmp_path / "in.png"
    make_test_image(48).save(image)
    argv = ["edit", str(image), "--source", "a red ball", "--target", "a blue ball", "--steps", "5"]
    assert cli.main([*argv, "--backend", "onnxruntime", "--out", str(tmp_path / "out.png"), "-q"]) == 0
    assert mtimes(cache) == stamps


def test_list_shows_the_entries(first, tmp_path):
    cache, status, *_ = first
    assert status == 0
    status, out, err = run(["export", "--list", "--cache-dir", str(cache), "--json", str(tmp_path / "list.json")])
    assert status == 0, err
    assert f"cache {cache}: 3 entries" in out
    for _, signature in GRAPHS:
        assert any(signature in line and "tiny" in line and "float32" in line for line in out.splitlines())
    listing = json.loads((tmp_path / "list.json").read_text())
    assert {e["signature"] for e in listing["entries"]} == {s for _, s in GRAPHS}
    assert listing["size_bytes"] == sum(e["size_bytes"] for e in listing["entries"]) > 0
    assert run(["export", "--list", "--cache-dir", str(tmp_path / "none")])[1].startswith("pyinv export: cache")


def test_an_interrupted_export_writes_no_report(first, tmp_path, monkeypatch):
    cache, status, *_ = first
    assert status == 0
    real = export.run_layout

    def stop_at_the_second(editor, layout):
        if layout.label == LAYOUTS[1]:
            raise KeyboardInterrupt
        return real(editor, layout)

    monkeypatch.setattr(export, "run_layout", stop_at_the_second)
    report = tmp_path / "report.json"
    status, out, err = run(["export", "--cache-dir", str(cache), "--layouts", *LAYOUTS, "--json", str(report), "-q"])
    assert status == 130 and err.strip() == "pyinv: error: interrupted"
    assert not report.exists() and list(tmp_path.iterdir()) == []
    assert len(ExportCache(cache).entries()) == 3


def test_an_sdxl_model_exports(tmp_path):
    """``pyinv export --model tiny-xl``: SDXL's graphs (the packed embeddings split inside
    them), which an edit on the same cache then finds."""
    cache, report = tmp_path / "exports", tmp_path / "xl.json"
    argv = ["export", "--model", "tiny-xl", "--cache-dir", str(cache), "--layouts", "direct+p2p"]
    status, out, err = run([*argv, "--json", str(report)])
    assert status == 0, err
    done = json.loads(report.read_text())
    assert done["model"] == "tiny-xl" and done["totals"]["built"] == 2
    assert {g["signature"] for g in done["graphs"]} == {"R=1 16×16 plain", "R=3 16×16 p2p(cross,self)"}
    assert out.splitlines()[0].startswith("pyinv export: model tiny-xl, onnxruntime")
    backend = OnnxRuntimeBackend(cache=cache)
    editor = pyinv.Editor.from_pretrained("tiny-xl", backend=backend)
    inv = editor.invert(make_test_image(32), "a photo of a red ball", method="direct", steps=4, seed=1)
    editor.edit(inv, "a photo of a blue cube", control=pyinv.P2P())
    assert backend.built == [] and len(backend.found) == 2


# ---------------------------------------------------------------------- mistakes
ERRORS = {
    "unknown method": (["--layouts", "foo+p2p"], "unknown method 'foo'"),
    "unknown control": (["--layouts", "direct+blur"], "unknown control 'blur'"),
    "no control for edict": (["--layouts", "edict+p2p"], "takes no attention control"),
    "bad targets": (["--layouts", "direct+p2p:x"], "is not METHOD[+CONTROL][:TARGETS]"),
    "no method": (["--layouts", "+p2p"], "is not METHOD[+CONTROL][:TARGETS]"),
    "two controls": (["--layouts", "direct+p2p+pnp"], "is not METHOD[+CONTROL][:TARGETS]"),
    "zero targets": (["--layouts", "direct+p2p:0"], "TARGETS must be 1"),
    "no layouts": (["--layouts"], "expected at least one argument"),
    "eager backend": (["--backend", "eager"], "backend 'eager' exports no graphs"),
    "compile backend": (["--backend", "compile"], "backend 'compile' exports no graphs"),
    "unknown backend": (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    "resolution": (["--resolution", "30"], "--resolution 30 is not a multiple of 4 for model 'tiny'"),
    "tiny resolution": (["--resolution", "4"], "expected an integer in [8, 4096]"),
}


@pytest.mark.parametrize("argv, message", ERRORS.values(), ids=ERRORS.keys())
def test_mistakes_are_one_line_usage_errors(argv, message, tmp_path):
    cache, report = tmp_path / "exports", tmp_path / "report.json"
    status, out, err = run(["export", "--cache-dir", str(cache), "--json", str(report), *argv])
    assert status == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("pyinv: error: ")
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no cache, no report


def test_a_dtype_the_backend_cannot_run(tmp_path):
    status, out, err = run(["export", "--cache-dir", str(tmp_path / "c"), "--dtype", "bf16"])
    assert status == 1 and "float32 or float16" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_help_describes_layouts_and_the_cache(capsys):
    assert cli.main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "PYINV_CACHE_DIR" in text and "METHOD[+CONTROL][:TARGETS]" in text
    assert " ".join(export.DEFAULT_LAYOUTS) in " ".join(text.split())


# ---------------------------------------------------------------------- pieces
def test_layouts_are_parsed_to_registered_names():
    assert export.parse_layout("NTI+P2P:2") == export.Layout("null-text", "p2p", 2)
    assert export.parse_layout(" ddim+pnp ").label == "ddim+pnp"
    assert export.parse_layout("direct+none").label == export.parse_layout("direct").label == "direct"
    assert export.parse_layout("edit-friendly+p2p:2").label == "edit-friendly+p2p:2"
    assert export.parse_layout("edict") == export.Layout("edict", "none", 1)


@pytest.mark.parametrize(
    "method, control, steps",
    [
        ("direct", "p2p", 3),  # self window 0.4: int(0.4 N) ≥ 1
        ("direct", "masactrl", 5),  # start_step 4: a fifth call
        ("ddim", "pnp", 2),
        ("direct", "none", 2),
        ("edit-friendly", "p2p", 5),  # self window 0.2 with EF-DDPM
        ("edit-friendly", "masactrl", 8),  # 5 calls after skipping round(0.36 N)
        ("edict", "none", 2),
    ],
)
def test_just_enough_steps_for_the_controller(method, control, steps):
    assert export.steps_for(get_method(method), control) == steps


def test_any_backend_made_with_a_cache_exports(monkeypatch):
    assert export.exporting_backends() == ["onnxruntime", "tensorrt"]

    class EngineBackend(Backend):
        name = "engine"

        def __init__(self, cache=None):
            self.cache, self.built = cache, []

    monkeypatch.setitem(BACKENDS, "engine", EngineBackend)
    assert export.exporting_backends() == ["onnxruntime", "tensorrt", "engine"]
    assert export.backend_arg("Engine") == "engine"
