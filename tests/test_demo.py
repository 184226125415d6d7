"""The demo model: the shipped weights load offline, draw what they are asked, and edit;
the CLI defaults to it; ``pyinv generate`` and ``pyinv eval shapes`` run end to end."""

from __future__ import annotations

import json
import os

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import pyinv
from pyinv import cli
from pyinv.cli import common
from pyinv.presets import DEMO_FOLDER
from pyinv.shapes import read
from pyinv.shapes.quality import check_quality

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "red-circle.png")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def demo() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("demo")


def test_demo_preset_is_a_small_pixel_space_v_model(demo):
    model = demo.model
    assert model.vae is None and model.image_size == 32 and model.latent_channels == 3
    assert model.prediction_type == "v_prediction"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DEMO_FOLDER) for f in files)
    assert size <= 25 * 2**20
    with open(os.path.join(DEMO_FOLDER, "training.json"), encoding="utf-8") as f:
        assert json.load(f)["step"] > 0
    # loadable by transformers 4.x too: prefixed text-encoder keys, a vocab.json/merges.txt tokenizer
    from safetensors import safe_open

    with safe_open(os.path.join(DEMO_FOLDER, "text_encoder", "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    for name in ("vocab.json", "merges.txt"):
        assert os.path.isfile(os.path.join(DEMO_FOLDER, "tokenizer", name))


def test_demo_draws_what_it_is_asked(demo):
    scenes = [("circle", "red", "blue"), ("square", "white", "black"), ("triangle", "yellow", "purple"),
              ("square", "green", "orange")]  # fmt: skip
    prompts = [f"a {color} {shape} on a {background} background" for shape, color, background in scenes]
    images = demo.generate(prompts, seed=[11, 12, 13, 14], steps=25)
    assert all(img.size == (32, 32) for img in images)
    readings = [read(img) for img in images]
    right = [r.matches(*scene) for r, scene in zip(readings, scenes, strict=True)]
    assert sum(right) >= 3, [f"{r.color} {r.shape} on {r.background}" for r in readings]


def test_an_image_depends_only_on_its_prompt_and_seed(demo):
    both = demo.generate(
        ["a red circle on a blue background", "a blue square on a white background"], seed=[3, 4], steps=8
    )
    alone = demo.generate("a blue square on a white background", seed=4, steps=8)
    diff = np.abs(np.asarray(both[1], dtype=int) - np.asarray(alone[0], dtype=int))
    assert diff.max() <= 1  # batch-dependent float rounding only
    again = demo.generate("a blue square on a white background", seed=5, steps=8)
    assert np.abs(np.asarray(again[0], dtype=int) - np.asarray(alone[0], dtype=int)).max() > 20


def test_generate_checks_its_arguments(demo):
    with pytest.raises(pyinv.PyinvError, match="empty"):
        demo.generate("  ")
    with pytest.raises(pyinv.PyinvError, match="steps"):
        demo.generate("a red circle on a blue background", steps=0)
    with pytest.raises(pyinv.PyinvError, match="2 prompts but 1 seeds"):
        demo.generate(["a", "b"], seed=[1])


def test_quality_check_runs(demo):
    report, images = check_quality(demo, count=3, steps=6, batch=2)
    assert report.count == 3 and len(images) == 3
    assert 0.0 <= report.accuracy <= min(report.shape_accuracy, report.color_accuracy, report.background_accuracy)
    assert "samples" in report.lines()[0]


def test_quality_report_carries_its_provenance(tmp_path, capsys):
    from pyinv.shapes.quality import main as quality_main

    path = tmp_path / "quality.json"
    assert quality_main(["--count", "2", "--steps", "3", "--batch", "2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["benchmark"] == "demo-quality" and report["device"] == "cpu"
    assert report["settings"] == {"model": "demo", "count": 2, "steps": 3, "guidance": 7.5, "schedule": "reference"}
    assert report["versions"]["torch"] == torch.__version__ and "commit" in report
    assert report["count"] == 2 and 0.0 <= report["accuracy"] <= 1.0


# ---------------------------------------------------------------------- command line
def test_cli_defaults_to_demo_and_the_readme_edit_is_real(tmp_path, capsys):
    assert common.DEFAULT_MODEL == "demo"
    out = tmp_path / "green.png"
    status = cli.main(
        ["edit", EXAMPLE, "--source", "a red circle on a blue background",
         "--target", "a green circle on a blue background", "--out", str(out), "-q"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    reading = read(Image.open(out))
    assert (reading.color, reading.shape, reading.background) == ("green", "circle", "blue")


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "circle.png"
    argv = ["generate", "a red circle on a blue background", "--steps", "4", "--count", "2", "--seed", "7", "--out"]
    assert cli.main([*argv, str(out)]) == 0
    err = capsys.readouterr().err
    assert "generated 2 images (4 steps, seed 7)" in err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["circle-1.png", "circle-2.png"]
    assert Image.open(tmp_path / "circle-1.png").size == (32, 32)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", " ", "--out", "x.png"], "PROMPT is empty"),
        (["generate", "a red circle", "--steps", "0", "--out", "x.png"], "positive integer"),
        (["generate", "a red circle", "--out", "x.txt"], "unsupported output image type"),
        (["generate", "a red circle", "--model", "./no/such", "--out", "x.png"], "not found"),
    ],
)
def test_cli_generate_mistakes_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status in (1, 2) and len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_eval_shapes_end_to_end(tmp_path, capsys):
    js, md = tmp_path / "shapes.json", tmp_path / "shapes.md"
    argv = ["eval", "shapes", "--count", "1", "--method", "direct", "--method", "ddim", "--control", "p2p"]
    status = cli.main([*argv, "--steps", "10", "--json", str(js), "--markdown", str(md), "-q"])
    assert status == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["method", "control", "success"] and len(table) == 4
    report = json.loads(js.read_text())
    assert report["benchmark"] == "shapes" and report["device"] == "cpu" and report["versions"]["torch"]
    assert [r["method"] for r in report["summary"]] == ["direct", "ddim"]
    assert len(report["edits"]) == 6 and {e["kind"] for e in report["edits"]} == {"color", "shape", "background"}
    for edit in report["edits"]:
        assert 0 <= edit["iou"] <= 1 and edit["seconds"] > 0 and isinstance(edit["success"], bool)
    lines = md.read_text().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| direct | p2p |")


def test_eval_shapes_refuses_bad_choices_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_editor", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["eval", "shapes", "--method", "edict", "--control", "p2p"]) == 1
    assert "takes no attention control" in capsys.readouterr().err
    assert cli.main(["eval", "shapes", "--json", str(tmp_path / "missing" / "x.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["eval", "shapes", "--count", "0"]) == 2


SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def _colour_distance(image, name: str) -> float:
    """RGB distance of the mean colour of the shape the evaluator reads to the palette's ``name``."""
    from pyinv.shapes.world import COLORS

    r = read(image)
    assert r.mask.any()
    mean = np.asarray(image.convert("RGB"), dtype=np.float64)[r.mask].mean(0)
    return float(np.sqrt(((mean - np.array(COLORS[name])) ** 2).sum()))


def test_readme_example_with_pnp_defaults_edits_the_colour(demo):
    """PnP's reference negative prompt ("ugly, blurry, black, low res, unrealistic") is words the
    demo model never saw; as its CFG anchor it painted the circle purple. At its defaults on the
    demo model, PnP keeps the method's own unconditional embedding, as ShapesBench runs it."""
    from pyinv.bench.shapes_bench import controller_for

    inv = demo.invert(EXAMPLE, SOURCE, method="direct")
    out = demo.edit(inv, TARGET, control=pyinv.PnP())
    r = read(out.images[0])
    assert (r.shape, r.color, r.background) == ("circle", "green", "blue")
    bench = demo.edit(inv, TARGET, control=controller_for("pnp", None))
    assert np.array_equal(np.asarray(bench.images[0]), np.asarray(out.images[0]))


def test_readme_example_with_edit_friendly_and_p2p_defaults_is_not_washed_out(demo):
    """EF-DDPM + P2P at DDPM_inversion's windows (0.6 / 0.2); P2P's own 0.8 / 0.4 (its DDIM
    setting) replaced self-attention for 40 of the 64 steps run and left a pale green (33)."""
    inv = demo.invert(EXAMPLE, SOURCE, method="edit-friendly")
    out = demo.edit(inv, TARGET, control=pyinv.P2P())
    assert read(out.images[0]).matches("circle", "green", "blue")
    assert _colour_distance(out.images[0], "green") < 25
