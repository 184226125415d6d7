"""Every input the CLI and the API accept is untrusted: one clear line (a ``PyinvError`` in
the API), a non-zero exit status and no output, class by class.

Runs in-process on the tiny model with 2 steps; subprocesses only where the real entry point
matters (Ctrl-C while the libraries load, a closed stdout pipe).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_test_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import pyinv
from pyinv import PyinvError, cli
from pyinv.argtypes import count_arg, guidance_arg, seed_arg
from pyinv.checks import MAX_GUIDANCE, SEED_MAX
from pyinv.cli import common
from pyinv.imageio import check_writable, load_image

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
FAST = ["--steps", "2", "-q"]
LONG = " ".join(["ball"] * 80)  # 80 tokens: past the 75 a 77-position CLIP text encoder reads

pytestmark = pytest.mark.usefixtures("tiny_cli_default")


@pytest.fixture(scope="module")
def source_png(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("in") / "rgb.png")
    make_test_image(48).save(path)
    return path


@pytest.fixture(scope="module")
def inversion(editor):
    return editor.invert(make_test_image(), SRC, method="ddim", steps=2)


def one_error_line(status: int, capsys, *must_not_exist: str | Path) -> str:
    """Non-zero status, exactly one ``pyinv: error:`` line on stderr, nothing on stdout or disk."""
    out, err = capsys.readouterr()
    assert status != 0, err
    assert out == "" and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyinv: error: "), err
    for path in must_not_exist:
        assert not os.path.exists(path), path
    return lines[0]


def edit_argv(image: str, out: Path, *extra: str) -> list[str]:
    return ["edit", image, "--source", SRC, "--target", TGT, "--method", "ddim", *FAST, "--out", str(out), *extra]


def no_model_load(monkeypatch) -> None:
    """Checks that must come before the model is loaded."""
    monkeypatch.setattr(common, "load_editor", lambda *a, **k: pytest.fail("the model was loaded"))


# ---------------------------------------------------------------------- integers beyond what the code can hold
@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--seed", str(2**70)], "at most 2**64-1"),
        (["--seed", str(SEED_MAX), "--count", "2"], "goes past the largest seed"),
        (["--seed", "-5"], "non-negative"),
        (["--seed", "1" * 5000], "expected an integer seed"),
        (["--count", "1000000000"], "[1, 100]"),
        (["--steps", str(2**70)], "steps"),
        (["--steps", "1000"], "1000 steps do not fit the reference spacing"),
    ],
)
def test_integers_out_of_range(argv, phrase, tmp_path, capsys, monkeypatch):
    if "--steps" not in argv:
        no_model_load(monkeypatch)
    out = tmp_path / "g.png"
    status = cli.main(["generate", "a red ball", "--out", str(out), "-q", *argv])
    assert phrase in one_error_line(status, capsys, out, tmp_path / "g-1.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "shapes", "--count", str(10**20)],
        ["benchmark", "--resolution", str(10**9)],
        ["benchmark", "--warmup", "-1"],
        ["benchmark", "--repeats", str(2**70)],
    ],
)
def test_run_sizes_out_of_range(argv, capsys):
    assert "expected an integer in [" in one_error_line(cli.main(argv), capsys)


@pytest.mark.parametrize("seed", [2**64, -1, 2**70, 1.5, "3", True])
def test_api_seeds_out_of_range(editor, inversion, seed):
    with pytest.raises(PyinvError, match="seed"):
        editor.generate("a red ball", seed=seed, steps=1)
    with pytest.raises(PyinvError, match="seed"):
        editor.invert(make_test_image(), SRC, method="ddim", steps=1, seed=seed)
    with pytest.raises(PyinvError, match="seed"):
        editor.edit(inversion, TGT, seed=seed)


def test_largest_seed_is_usable(editor):
    assert len(editor.generate(["a red ball"] * 2, seed=[SEED_MAX, 0], steps=1)) == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**80), max_value=2**80) | st.text(max_size=12))
def test_numeric_arguments_parse_or_fail_in_one_line(value):
    """A seed, guidance or count is either accepted within range or refused with an argparse error."""
    text = str(value)
    for parse, ok in (
        (seed_arg, lambda v: isinstance(v, int) and 0 <= v <= SEED_MAX),
        (guidance_arg, lambda v: 0 <= v <= MAX_GUIDANCE),
        (count_arg, lambda v: 1 <= v <= 100),
    ):
        try:
            assert ok(parse(text))
        except argparse.ArgumentTypeError as exc:
            assert "\n" not in str(exc)


# ---------------------------------------------------------------------- devices
BAD_DEVICES = ["mps", "meta", "xla", "vulkan", "cpu:3", "cuda:-1", "cuda:99", "", "gpu"]


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_unsupported_devices(device, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    out = tmp_path / "g.png"
    status = cli.main(["generate", "a red ball", "--device", device, "--out", str(out), "-q"])
    assert "device" in one_error_line(status, capsys, out)
    with pytest.raises(PyinvError, match="device"):
        pyinv.Editor.from_pretrained("tiny", device=device)


def test_device_of_another_type_in_the_api():
    with pytest.raises(PyinvError, match="device"):
        pyinv.Editor.from_pretrained("tiny", device=0)


# ---------------------------------------------------------------------- output paths
def test_unwritable_output_fails_before_the_model_loads(source_png, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    cases = [("x" * 300 + ".png", "too long")]
    if os.path.isdir("/proc"):
        cases.append(("/proc/pyinv-out.png", "cannot write /proc/pyinv-out.png"))
    for name, phrase in cases:
        out = tmp_path / name if not name.startswith("/") else Path(name)
        line = one_error_line(cli.main(edit_argv(source_png, out)), capsys)
        assert phrase in line and str(out) in line and ".pyinv-" not in line
    assert list(tmp_path.iterdir()) == []


def test_failed_write_names_the_users_path(source_png, tmp_path, capsys, monkeypatch):
    import pyinv.imageio

    def no_space(src, dst):
        raise OSError(28, "No space left on device", src)

    monkeypatch.setattr(pyinv.imageio.os, "replace", no_space)
    out = tmp_path / "out.png"
    line = one_error_line(cli.main(edit_argv(source_png, out)), capsys, out)
    assert line == f"pyinv: error: cannot write {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PyinvError, match=f"cannot write {out}"):
        pyinv.imageio.save_image(make_test_image(), out)


def test_check_writable_probes_the_folder(tmp_path):
    assert check_writable(tmp_path / "ok.png") == str(tmp_path / "ok.png")
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    with pytest.raises(PyinvError, match="NUL"):
        check_writable(str(tmp_path / "a\0b.png"))


# ---------------------------------------------------------------------- numbers that blow up
@pytest.mark.parametrize("guidance", ["1e20", "51", "inf", "nan", "-1"])
def test_guidance_out_of_range(guidance, source_png, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    out = tmp_path / "out.png"
    assert "--guidance" in one_error_line(cli.main(edit_argv(source_png, out, "--guidance", guidance)), capsys, out)


@pytest.mark.parametrize("guidance", [1e20, 50.5, float("nan"), -1, "a lot", True])
def test_api_guidance_out_of_range(editor, inversion, guidance):
    with pytest.raises(PyinvError, match="guidance"):
        editor.edit(inversion, TGT, guidance=guidance)
    with pytest.raises(PyinvError, match="guidance"):
        editor.generate("a red ball", guidance=guidance, steps=1)


def _huge(inv: pyinv.Inversion) -> pyinv.Inversion:
    """Finite (float32 holds 1e30) but the edit overflows: what a huge guidance does."""
    return pyinv.Inversion(**{**inv.__dict__, "tensors": {k: v * 1e30 for k, v in inv.tensors.items()}})


def test_overflowing_edit_is_an_error(editor, inversion, tmp_path, capsys):
    with pytest.raises(PyinvError, match="non-finite"):
        editor.edit(_huge(inversion), TGT)
    path, out = tmp_path / "big.safetensors", tmp_path / "out.png"
    _huge(inversion).save(path)
    status = cli.main(["edit", "--inversion", str(path), "--target", TGT, "--out", str(out), "-q"])
    assert "the edit produced non-finite values" in one_error_line(status, capsys, out)


@pytest.mark.parametrize("value", [float("nan"), 1.0, -1.0, (1.0, -1.0, -1.0)])
def test_degenerate_result_is_an_error(editor, inversion, monkeypatch, value):
    """NaN pixels, or a blank image (every pixel one saturated colour), are errors, not images."""
    colour = torch.tensor(value if isinstance(value, tuple) else (value,) * 3).view(1, 3, 1, 1)
    monkeypatch.setattr(editor.model, "decode", lambda z: colour.expand(len(z), 3, 32, 32).clone())
    with pytest.raises(PyinvError, match="non-finite|blank image"):
        editor.edit(inversion, TGT)
    with pytest.raises(PyinvError, match="non-finite|blank image"):
        editor.generate("a red ball", steps=1)


def test_flat_but_unsaturated_results_are_images(editor, inversion, monkeypatch):
    """A flat mid-grey (or a flat reconstruction of a flat image) is an image, not an error."""
    monkeypatch.setattr(editor.model, "decode", lambda z: torch.zeros(len(z), 3, 32, 32))
    assert len(editor.edit(inversion, TGT).images) == 1
    monkeypatch.setattr(editor.model, "decode", lambda z: torch.ones(len(z), 3, 32, 32))
    assert editor.reconstruct(inversion).source_image is not None


def test_reweight_scale_must_be_finite(source_png, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    out = tmp_path / "out.png"
    argv = [*edit_argv(source_png, out), "--method", "direct", "--control", "p2p", "--edit", "reweight"]
    status = cli.main([*argv, "--reweight", "ball=nan"])
    assert "--reweight" in one_error_line(status, capsys, out)


# ---------------------------------------------------------------------- library warnings
def test_model_load_and_long_prompts_are_quiet(capfd):
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor = pyinv.Editor.from_pretrained("demo")
        editor.model.token_count(LONG)
    out, err = capfd.readouterr()
    assert err == "" and out == "", err
    assert [str(w.message) for w in caught] == []


def test_pillow_bomb_warning_stays_inside(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    make_test_image(48).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 48² = 2304: Pillow warns, pyinv's own limit allows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(path).size == (48, 48)
    assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------------- prompts over the token limit
def test_long_prompt_is_an_error(editor, inversion, source_png, tmp_path, capsys):
    with pytest.raises(PyinvError, match="80 tokens long but model 'tiny' reads at most 75"):
        editor.edit(inversion, LONG)
    with pytest.raises(PyinvError, match="source prompt is 80 tokens"):
        editor.invert(make_test_image(), LONG, method="ddim", steps=1)
    with pytest.raises(PyinvError, match="tokens long"):
        editor.generate(LONG, steps=1)
    out = tmp_path / "out.png"
    argv = ["edit", source_png, "--source", SRC, "--target", LONG, *FAST, "--out", str(out)]
    assert "target prompt is 80 tokens long" in one_error_line(cli.main(argv), capsys, out)


@pytest.mark.parametrize("flag", ["--source", "--target"])
def test_prompt_that_is_not_text(flag, source_png, tmp_path, capsys, monkeypatch):
    """Undecodable bytes on a command line arrive as lone surrogates; the tokenizer cannot take them."""
    no_model_load(monkeypatch)
    out = tmp_path / "out.png"
    line = one_error_line(cli.main([*edit_argv(source_png, out), flag, "a cat \udcff"]), capsys, out)
    assert f"{flag} is not valid text" in line


def test_api_prompt_that_is_not_text(editor, inversion):
    with pytest.raises(PyinvError, match="not valid text"):
        editor.edit(inversion, "a \udcff")
    with pytest.raises(PyinvError, match="must be a string"):
        editor.generate(["a red ball", 3], steps=1)
    for value in (3, None, {"a": 1}):
        with pytest.raises(PyinvError, match="must be a string"):
            editor.edit(inversion, value)
        with pytest.raises(PyinvError, match="must be a string"):
            editor.generate(value, steps=1)
    with pytest.raises(PyinvError, match="no prompt given"):
        editor.generate([], steps=1)


def test_blend_word_past_the_limit_says_why(source_png, tmp_path, capsys):
    out = tmp_path / "out.png"
    target = LONG + " cube"
    argv = ["edit", source_png, "--source", SRC, "--target", target, *FAST, "--out", str(out)]
    line = one_error_line(cli.main([*argv, "--blend-words", "ball cube"]), capsys, out)
    assert "tokens long" in line and "not in the prompt" not in line
    line = one_error_line(cli.main([*argv, "--edit", "reweight", "--reweight", "cube=2"]), capsys, out)
    assert "tokens long" in line


# ---------------------------------------------------------------------- images
def test_exif_orientation_is_honoured(tmp_path):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 32, 32))  # blue left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display" — a phone held upright
    path = tmp_path / "phone.jpg"
    wide.save(path, exif=exif.tobytes(), quality=95)
    upright = load_image(path)
    assert upright.size == (32, 64)
    top = np.asarray(upright)[:8].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the stored left (blue) half is now on top


def test_32_bit_integer_images_are_scaled_by_their_range():
    ramp = np.linspace(2**20, 2**31 - 1, 48 * 48).reshape(48, 48).astype(np.int32)
    grey = np.asarray(load_image(Image.fromarray(ramp, mode="I")))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and 100 < grey.mean() < 155
    small = np.asarray(load_image(Image.fromarray(np.full((48, 48), 128, np.int32), mode="I")))
    assert (small == 128).all()  # 8-bit data in an "I" image keeps its values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused(bad, tmp_path, capsys, monkeypatch):
    arr = np.full((48, 48), bad, np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(arr, mode="F").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        with pytest.raises(PyinvError, match="non-finite"):
            load_image(path)
    no_model_load(monkeypatch)
    out = tmp_path / "out.png"
    assert "non-finite pixel" in one_error_line(cli.main(edit_argv(str(path), out)), capsys, out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-(2**31), 2**31 - 1),
        min_size=4,
        max_size=4,
    ),
    st.sampled_from(["F", "I"]),
)
def test_any_pixel_values_load_or_fail_cleanly(values, mode):
    corners = np.array(values, dtype=np.float64).reshape(2, 2)
    arr = np.kron(corners, np.ones((8, 8)))
    arr = arr.astype(np.float32) if mode == "F" else np.nan_to_num(arr).clip(-(2**31), 2**31 - 1).astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            img = load_image(Image.fromarray(arr, mode=mode))
        except PyinvError as exc:
            assert "non-finite" in str(exc)
        else:
            assert img.mode == "RGB" and img.size == (16, 16)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    make_test_image(24).save(buffer, format=fmt)
    return buffer.getvalue()


ENCODED = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM", "ICO")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(list(ENCODED)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.integers(1, 10_000),
)
def test_damaged_image_files_fail_cleanly(fmt, edits, cut, tmp_path):
    """Bytes of a good file changed here and there (headers mostly), maybe cut short: the image
    loads or fails with a PyinvError; no other exception, no warning, no file left open."""
    data = bytearray(ENCODED[fmt])
    for at, value in edits:
        data[at % min(len(data), 256 if at % 3 else len(data))] = value
    path = tmp_path / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(data[:cut]))
    unraisable = []  # an unclosed file warns when it is collected, where warnings cannot raise
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a Pillow warning fails the test
            try:
                assert load_image(path).mode == "RGB"
            except PyinvError:
                pass
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert [str(u.exc_value) for u in unraisable] == []


@pytest.mark.parametrize(
    "source", [np.zeros((48, 48, 3), np.float32), np.zeros((48, 48, 7), np.uint8), np.zeros(5, np.uint8), 42]
)
def test_api_image_of_a_wrong_kind(editor, source):
    with pytest.raises(PyinvError, match="image"):
        editor.invert(source, SRC, method="ddim", steps=1)


@pytest.mark.parametrize(
    "z0",
    [
        torch.zeros(1, 4, 8, 8),
        torch.zeros(4, 16, 16),
        torch.full((1, 4, 16, 16), float("nan")),
        np.zeros((1, 4, 16, 16)),
    ]
    + [torch.zeros(1, 4, 16, 16, dtype=torch.int64)],
)
def test_api_latents_of_a_wrong_kind(editor, z0):
    with pytest.raises(PyinvError, match="latents"):
        editor.invert_latents(z0, SRC, method="ddim", steps=2)


# ---------------------------------------------------------------------- the API's method options
@pytest.mark.parametrize(
    "method, options",
    [
        ("null-text", {"inner_steps": "a"}),
        ("null-text", {"inner_steps": -3}),
        ("null-text", {"inner_steps": 2**70}),
        ("null-text", {"epsilon": float("nan")}),
        ("prompt-tuning", {"inner_steps": 1.5}),
        ("prompt-tuning", {"init_prompt": 3}),
        ("direct", {"form": 3}),
        ("edict", {"mixing": "x"}),
    ],
)
def test_api_invert_options_of_a_wrong_kind(editor, method, options):
    source = "" if "init_prompt" in options else SRC  # prompt-tuning starts from init_prompt without a source
    with pytest.raises(PyinvError, match="|".join(options)):
        editor.invert(make_test_image(), source, method=method, steps=2, **options)


@pytest.mark.parametrize(
    "method, options",
    [("prompt-tuning", {"eta": "x"}), ("prompt-tuning", {"eta": float("nan")}), ("ddim", {"skip": 1})],
)
def test_api_edit_options_of_a_wrong_kind(editor, method, options):
    extra = {"inner_steps": 1} if method == "prompt-tuning" else {}
    inv = editor.invert(make_test_image(), SRC, method=method, steps=2, **extra)
    with pytest.raises(PyinvError):
        editor.edit(inv, TGT, **options)


# ---------------------------------------------------------------------- the API's control argument
def test_control_by_name(editor, inversion):
    assert len(editor.edit(inversion, TGT, control="p2p").images) == 1
    assert len(editor.edit(inversion, TGT, control="none").images) == 1


@pytest.mark.parametrize("control", ["magic", 3, object(), pyinv.P2P])
def test_control_of_a_wrong_kind(editor, inversion, control):
    with pytest.raises(PyinvError, match="control"):
        editor.edit(inversion, TGT, control=control)


def test_control_for_a_method_without_one(editor):
    inv = editor.invert(make_test_image(), SRC, method="edict", steps=2)
    with pytest.raises(PyinvError, match="does not support attention control"):
        editor.edit(inv, TGT, control="p2p")


# ---------------------------------------------------------------------- the real entry point
def _pyinv(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "pyinv", *argv], env=env, text=True, **kwargs)


def _mapped(pid: int, library: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return library in f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see what the process has loaded")
@pytest.mark.parametrize("library", ["_multiarray_umath", "libtorch", "diffusers"])
def test_ctrl_c_while_the_libraries_load(library, source_png, tmp_path):
    """Ctrl-C as numpy's C core loads (where a KeyboardInterrupt used to be swallowed or turn
    into an ImportError), as torch loads, and later: one line, status 130, no output."""
    out = tmp_path / "out.png"
    argv = [*edit_argv(source_png, out), "--model", "tiny"]
    proc = _pyinv(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    marker = library if library != "diffusers" else "libtorch"
    while proc.poll() is None and time.monotonic() < deadline and not _mapped(proc.pid, marker):
        time.sleep(0.005)
    if library == "diffusers":
        time.sleep(1.0)  # past torch: diffusers and transformers import, the model loads
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == ["pyinv: error: interrupted"] and stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_closed_stdout_pipe_is_quiet():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before pyinv writes: `pyinv info --json | head -0`
    proc = _pyinv("info", "--json", stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    _, stderr = proc.communicate(timeout=120)
    assert stderr == "" and proc.returncode == 141


# ---------------------------------------------------------------------- any command line
class _Loaded(Exception):
    """Raised instead of loading a model: the arguments passed every check before it."""


VALUES = st.sampled_from(
    ["0", "-1", "2", "1e20", "nan", "inf", "-inf", str(2**70), "0.5", "1:0", "0.2:0.8", "{", '{"x": [0, 2]}', "", " "]
    + ["cuda:7", "mps", "meta", "fp8", "x=nan", "a b", "x" * 300 + ".png", "/proc/x.png", "out.gif", "out.png"]
) | st.text(max_size=10)
FLAGS = [
    "--source", "--target", "--method", "--steps", "--guidance", "--inversion-guidance", "--seed", "--device",
    "--dtype", "--schedule", "--form", "--inner-steps", "--eta", "--skip", "--control", "--edit", "--cross-replace",
    "--self-replace", "--reweight", "--blend-words", "--blend-threshold", "--blend-start", "--masa-step",
    "--masa-layer", "--pnp-feature-steps", "--pnp-attention-steps", "--negative-prompt", "--count", "--out",
    "--save-inversion", "--model",
]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["edit", "invert", "generate"]),
    options=st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), max_size=6),
)
def test_any_command_line_is_accepted_or_one_line(command, options, source_png, tmp_path, capsys, monkeypatch):
    """Random flags and values: either every check passes (and the model would load) or the
    run ends with exactly one error line and a non-zero status, never a traceback or a file."""

    def loaded(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(common, "load_editor", loaded)
    monkeypatch.chdir(tmp_path)
    head = {  # the required arguments first; the random ones after them override them
        "edit": ["edit", source_png, "--source", SRC, "--target", TGT, "--out", "o.png"],
        "invert": ["invert", source_png, "--source", SRC, "--out", "o.safetensors"],
        "generate": ["generate", "a red ball", "--out", "o.png"],
    }
    argv = [*head[command], *(part for pair in options for part in pair)]
    try:
        status = cli.main(argv)
    except _Loaded:
        capsys.readouterr()
    else:
        one_error_line(status, capsys)
    assert [p.name for p in tmp_path.iterdir()] == []
