"""The ``pyinv`` command line: successful runs, and every user mistake as one clean line.

Runs in-process through :func:`pyinv.cli.main` on the tiny model with 2–3 steps, plus one
subprocess run of ``python -m pyinv`` to show no traceback escapes the real entry point.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import make_test_image
from PIL import Image

from pyinv import cli
from pyinv.cli import common
from pyinv.inversion import METHODS

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
FAST = ["--steps", "2"]

#: these tests run the CLI on the tiny model (the demo default has its own tests)
pytestmark = pytest.mark.usefixtures("tiny_cli_default")


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest single-threaded (and is not slowed by busy CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may try the network (hub ids that do not exist must fail fast)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width × height`` pixels in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Input files: good images in several modes and broken ones."""
    folder = tmp_path_factory.mktemp("images")
    rgb = make_test_image(48)
    paths = {
        name: str(folder / name)
        for name in (
            "rgb.png",
            "grey.png",
            "rgba.png",
            "grey16.png",
            "cmyk.jpg",
            "palette.png",
            "tiny.png",
            "huge.png",
            "empty.png",
            "truncated.png",
            "text.png",
        )
    }
    rgb.save(paths["rgb.png"])
    rgb.convert("L").save(paths["grey.png"])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(paths["rgba.png"])
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    assert grey16.mode == "I;16"
    grey16.save(paths["grey16.png"])
    rgb.convert("CMYK").save(paths["cmyk.jpg"])
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette.png"])
    rgb.resize((4, 4)).save(paths["tiny.png"])
    Path(paths["huge.png"]).write_bytes(_png_header_only(20000, 20000))
    Path(paths["empty.png"]).write_bytes(b"")
    data = Path(paths["rgb.png"]).read_bytes()
    Path(paths["truncated.png"]).write_bytes(data[: len(data) // 2])
    Path(paths["text.png"]).write_text("this is not an image\n")
    return paths


@pytest.fixture(scope="module")
def inversion_file(images, tmp_path_factory) -> str:
    """A direct inversion of ``rgb.png`` on the tiny model, made once through the CLI."""
    path = str(tmp_path_factory.mktemp("inv") / "rgb.safetensors")
    assert cli.main(["invert", images["rgb.png"], "--source", SRC, *FAST, "--out", path, "-q"]) == 0
    return path


# ---------------------------------------------------------------------- helpers
def assert_one_line_error(status: int, capsys, *must_not_exist: str | Path) -> str:
    """Non-zero status, exactly one ``pyinv: error:`` line on stderr, nothing written."""
    out, err = capsys.readouterr()
    assert status != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyinv: error: ") and lines[0][len("pyinv: error: ") :].strip(), err
    assert out == ""
    for path in must_not_exist:
        assert not os.path.exists(path), path
    return lines[0]


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".pyinv-") for p in folder.iterdir())


# ---------------------------------------------------------------------- successful runs
def test_edit_writes_png_of_model_size(images, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert (
        cli.main(["edit", images["rgb.png"], "--source", SRC, "--target", TGT, *FAST, "--seed", "0", "--out", str(out)])
        == 0
    )
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("pyinv: edited with direct") and str(out) in summary and "UNet image-forwards" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_several_targets_write_numbered_files_and_inversion(images, tmp_path, capsys):
    out, inv = tmp_path / "edit.jpg", tmp_path / "inv.safetensors"
    argv = [
        "edit",
        images["rgb.png"],
        "--source",
        SRC,
        "--target",
        TGT,
        "--target",
        "a photo of a green tree",
        "--method",
        "ddim",
        *FAST,
        "--save-inversion",
        str(inv),
        "--out",
        str(out),
        "-q",
    ]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""
    assert not out.exists()
    for name in ("edit-1.jpg", "edit-2.jpg"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "JPEG" and img.size == (32, 32)
    assert inv.stat().st_size > 0
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_edits_from_the_cli(method, images, tmp_path):
    out, inv = tmp_path / f"{method}.png", tmp_path / f"{method}.safetensors"
    argv = ["edit", images["rgb.png"], "--source", SRC, "--target", TGT, "--method", method, "--steps", "4"]
    assert cli.main([*argv, "--save-inversion", str(inv), "--out", str(out), "-q"]) == 0
    with Image.open(out) as img:
        assert img.size == (32, 32)
    again = tmp_path / f"{method}-again.png"
    assert cli.main(["edit", "--inversion", str(inv), "--target", TGT, "--out", str(again), "-q"]) == 0
    assert again.exists()


def test_invert_then_edit_inversion(inversion_file, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert (
        cli.main(
            [
                "edit",
                "--inversion",
                inversion_file,
                "--target",
                "a photo of a fox",
                "--guidance",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as img:
        assert img.size == (32, 32)
    assert "pyinv: edited" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["grey.png", "rgba.png", "grey16.png", "cmyk.jpg", "palette.png"])
def test_other_image_modes_are_converted(images, name, tmp_path):
    out = tmp_path / "out.png"
    assert (
        cli.main(
            ["edit", images[name], "--source", SRC, "--target", TGT, "--method", "ddim", *FAST, "--out", str(out), "-q"]
        )
        == 0
    )
    with Image.open(out) as img:
        assert img.size == (32, 32)


def test_prompt_tuning_without_source_uses_target(images, tmp_path):
    out = tmp_path / "out.png"
    assert (
        cli.main(
            [
                "edit",
                images["rgb.png"],
                "--target",
                TGT,
                "--method",
                "pti",
                *FAST,
                "--inner-steps",
                "1",
                "--eta",
                "0.5",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert out.exists()


def test_edit_friendly_with_skip(images, tmp_path):
    out = tmp_path / "out.png"
    assert (
        cli.main(
            [
                "edit",
                images["rgb.png"],
                "--source",
                SRC,
                "--target",
                TGT,
                "--method",
                "edit-friendly",
                "--steps",
                "3",
                "--skip",
                "1",
                "--seed",
                "1",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert out.exists()


def test_methods_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    methods, controls, families = capsys.readouterr().out.split("\n\n")
    listed = [line.split()[0] for line in methods.splitlines() if line and not line[0].isspace()]
    assert listed == list(METHODS)
    assert [line.split()[0] for line in controls.splitlines()[1:] if line.startswith("  ") and line[2] != " "] == [
        "none",
        "p2p",
        "masactrl",
        "pnp",
    ]
    assert [line.split()[0] for line in families.splitlines()[1:]] == ["SD", "SDXL"]
    assert "on SDXL 57 steps, guidance 5" in methods  # EF-DDPM's LEDITS++ settings there


def test_info_says_what_runs_on_each_model_family(capsys):
    assert cli.main(["info", "--json"]) == 0
    families = json.loads(capsys.readouterr().out)["families"]
    assert set(families) == {"SD", "SDXL"}
    for support in families.values():
        assert support["methods"] == list(METHODS) and support["controls"] == ["none", "p2p", "masactrl", "pnp"]
        assert support["backends"] == ["eager", "compile", "onnxruntime", "tensorrt"]
    ef = families["SDXL"]["defaults"]["edit-friendly"]
    assert ef == {"steps": 57, "guidance": 5.0, "inversion_guidance": 3.5}
    assert families["SD"]["defaults"]["edit-friendly"]["steps"] == 100
    assert families["SDXL"]["defaults"]["direct"] == families["SD"]["defaults"]["direct"]
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "SDXL: Stable Diffusion XL base" in text and "edit-friendly on SDXL: steps 57, guidance 5" in text


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert {"pyinv", "python", "diffusers", "transformers", "cuda_available"} <= set(info)
    step = info["ops"]["guided_step"]
    assert step["available"]["reference"] is True and step["active"]["cpu"] in step["usable"]["cpu"]
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "guided_step: cpu " in text and "available: reference" in text
    assert "cuda_available:" in text
    assert "UNet backends (--backend):" in text and "  eager: ready" in text


def test_info_says_which_backends_can_run(capsys, monkeypatch):
    import importlib.util

    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"]["eager"] == "ready"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert cli.main(["info", "--json"]) == 0
    why = json.loads(capsys.readouterr().out)["backends"]["onnxruntime"]
    assert why.startswith("needs ") and "onnxscript" in why and why.endswith("(pip install 'pyinv[export]')")


def test_help_exits_zero(capsys):
    assert cli.main(["edit", "--help"]) == 0
    assert "dog-1.png" in capsys.readouterr().out  # how several outputs are named
    assert cli.main(["--version"]) == 0


# ---------------------------------------------------------------------- user errors
Argv = Callable[[dict[str, str], Path], list[str]]


def _edit(image: str, *extra: str) -> Argv:
    return lambda imgs, tmp: [
        "edit",
        imgs.get(image, str(tmp / image)),
        "--source",
        SRC,
        "--target",
        TGT,
        *FAST,
        "--out",
        str(tmp / "out.png"),
        *extra,
    ]


ERRORS: dict[str, tuple[Argv, str]] = {
    "missing image": (_edit("nothere.png"), "not found"),
    "empty image": (_edit("empty.png"), "empty"),
    "truncated image": (_edit("truncated.png"), "truncated"),
    "not an image": (_edit("text.png"), "not an image"),
    "tiny image": (_edit("tiny.png"), "too small"),
    "huge image": (_edit("huge.png"), "too large"),
    "unknown method": (_edit("rgb.png", "--method", "magic"), "unknown method"),
    "option of another method": (_edit("rgb.png", "--inner-steps", "3"), "--inner-steps"),
    "unknown hub model": (_edit("rgb.png", "--model", "no-such-model"), "no-such-model"),
    "missing model folder": (_edit("rgb.png", "--model", "./missing/folder"), "not found"),
    "zero steps": (_edit("rgb.png", "--steps", "0"), "--steps"),
    "negative steps": (_edit("rgb.png", "--steps", "-3"), "--steps"),
    "fractional steps": (_edit("rgb.png", "--steps", "2.5"), "--steps"),
    "negative guidance": (_edit("rgb.png", "--guidance", "-1"), "--guidance"),
    "infinite guidance": (_edit("rgb.png", "--guidance", "inf"), "--guidance"),
    "nan guidance": (_edit("rgb.png", "--guidance", "nan"), "--guidance"),
    "eta out of range": (_edit("rgb.png", "--method", "prompt-tuning", "--eta", "2"), "--eta"),
    "bad dtype": (_edit("rgb.png", "--dtype", "fp8"), "dtype"),
    "bad device": (_edit("rgb.png", "--device", "warp-drive"), "device"),
    "bad output type": (
        lambda imgs, tmp: _edit("rgb.png")(imgs, tmp)[:-2] + ["--out", str(tmp / "out.gif")],
        "unsupported output",
    ),
    "output folder missing": (
        lambda imgs, tmp: _edit("rgb.png")(imgs, tmp) + ["--out", str(tmp / "no/out.png")],
        "does not exist",
    ),
    "empty source": (
        lambda imgs, tmp: ["edit", imgs["rgb.png"], "--source", " ", "--target", TGT, "--out", str(tmp / "out.png")],
        "--source is empty",
    ),
    "empty source, prompt-tuning": (
        lambda imgs, tmp: [
            "edit",
            imgs["rgb.png"],
            "--source",
            "",
            "--target",
            TGT,
            "--method",
            "pti",
            "--out",
            str(tmp / "out.png"),
        ],
        "empty",
    ),
    "empty target": (
        lambda imgs, tmp: [
            "edit",
            imgs["rgb.png"],
            "--source",
            SRC,
            "--target",
            TGT,
            "--target",
            "",
            "--out",
            str(tmp / "out.png"),
        ],
        "--target is empty",
    ),
    "no source": (
        lambda imgs, tmp: ["edit", imgs["rgb.png"], "--target", TGT, "--out", str(tmp / "out.png")],
        "--source",
    ),
    "no target": (
        lambda imgs, tmp: ["edit", imgs["rgb.png"], "--source", SRC, "--out", str(tmp / "out.png")],
        "--target",
    ),
    "no image": (lambda imgs, tmp: ["edit", "--target", TGT, "--out", str(tmp / "out.png")], "IMAGE"),
    "unknown command": (lambda imgs, tmp: ["paint"], "invalid choice"),
    "invert to an image file": (
        lambda imgs, tmp: ["invert", imgs["rgb.png"], "--source", SRC, "--out", str(tmp / "out.png")],
        "not an image",
    ),
    "invert without source": (
        lambda imgs, tmp: ["invert", imgs["rgb.png"], "--out", str(tmp / "out.png.st")],
        "--source",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line(case, images, tmp_path, capsys):
    make_argv, expected = ERRORS[case]
    status = cli.main(make_argv(images, tmp_path))
    line = assert_one_line_error(status, capsys, tmp_path / "out.png", tmp_path / "out.gif", tmp_path / "out.png.st")
    assert expected in line
    assert list(tmp_path.iterdir()) == []


def test_output_path_is_a_folder(images, tmp_path, capsys):
    folder = tmp_path / "out.png"
    folder.mkdir()
    status = cli.main(_edit("rgb.png")(images, tmp_path))
    assert "is a folder" in assert_one_line_error(status, capsys)
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_inversion_from_another_model(inversion_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    status = cli.main(["edit", "--inversion", inversion_file, "--target", TGT, "--model", "tiny-v", "--out", str(out)])
    assert "made with model 'tiny'" in assert_one_line_error(status, capsys, out)


def _garbage(good: bytes) -> bytes:
    return b"\x13\x37" * 64


def _cut(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _scrambled_header(good: bytes) -> bytes:
    return good[:8] + b"#" * 40 + good[48:]


@pytest.mark.parametrize("damage", [_garbage, _cut, _scrambled_header])
def test_corrupted_inversion_file(damage, inversion_file, tmp_path, capsys):
    bad, out = tmp_path / "bad.safetensors", tmp_path / "out.png"
    bad.write_bytes(damage(Path(inversion_file).read_bytes()))
    status = cli.main(["edit", "--inversion", str(bad), "--target", TGT, "--out", str(out)])
    assert "inversion file" in assert_one_line_error(status, capsys, out)


@pytest.mark.parametrize(
    "meta",
    [None, {"format": "pyinv.inversion", "format_version": 1}, {"format": "pyinv.inversion", "format_version": "one"}],
)
def test_inversion_file_with_bad_metadata(meta, tmp_path, capsys):
    from safetensors.torch import save_file

    bad, out = tmp_path / "plain.safetensors", tmp_path / "out.png"
    save_file({"x": torch.zeros(2)}, str(bad), metadata=None if meta is None else {"pyinv": json.dumps(meta)})
    status = cli.main(["edit", "--inversion", str(bad), "--target", TGT, "--out", str(out)])
    assert "inversion file" in assert_one_line_error(status, capsys, out)


def test_image_and_inversion_are_exclusive(images, inversion_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    status = cli.main(["edit", images["rgb.png"], "--inversion", inversion_file, "--target", TGT, "--out", str(out)])
    assert "not both" in assert_one_line_error(status, capsys, out)
    status = cli.main(["edit", "--inversion", inversion_file, "--steps", "3", "--target", TGT, "--out", str(out)])
    assert "--steps" in assert_one_line_error(status, capsys, out)


def test_failed_write_removes_earlier_outputs(images, tmp_path, capsys, monkeypatch):
    import pyinv.imageio

    real_save = pyinv.imageio.save_image
    calls = []

    def flaky_save(img, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        real_save(img, path)

    monkeypatch.setattr(pyinv.imageio, "save_image", flaky_save)
    out = tmp_path / "out.png"
    status = cli.main(
        [
            "edit",
            images["rgb.png"],
            "--source",
            SRC,
            "--target",
            TGT,
            "--target",
            "a photo of a cat",
            "--method",
            "ddim",
            *FAST,
            "--out",
            str(out),
            "-q",
        ]
    )
    line = assert_one_line_error(status, capsys, tmp_path / "out-1.png", tmp_path / "out-2.png")
    assert "No space left on device" in line and len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupt_is_one_line(images, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "load_editor", interrupted)
    out = tmp_path / "out.png"
    status = cli.main(_edit("rgb.png")(images, tmp_path))
    assert status == 130
    assert "interrupted" in assert_one_line_error(status, capsys, out)


# ---------------------------------------------------------------------- the real entry point
def test_console_entry_point_has_no_traceback(images, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *argv: subprocess.run(
        [sys.executable, "-m", "pyinv", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    bad = run("edit", images["empty.png"], "--source", SRC, "--target", TGT, "--out", str(tmp_path / "out.png"))
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"pyinv: error: image file is empty: {images['empty.png']}"]
    ok = run("--help")
    assert ok.returncode == 0 and "edit" in ok.stdout and "Traceback" not in ok.stderr
    assert list(tmp_path.iterdir()) == []
