"""``pyinv edit --control …``: every controller from the command line, and its mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_test_image
from PIL import Image
from test_cli import assert_one_line_error

from pyinv import cli
from pyinv.models import DiffusionModel

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
FAST = ["--steps", "4"]

#: these tests run the CLI on the tiny model (the demo default has its own tests)
pytestmark = pytest.mark.usefixtures("tiny_cli_default")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "ball.png"
    make_test_image(48).save(path)
    return str(path)


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Counts UNet image-forwards of the run (to show a mistake was caught before any)."""
    seen: list[int] = []
    original = DiffusionModel.unet_forward_controlled

    def counting(self, latents, *args, **kwargs):
        seen.append(latents.shape[0])
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(DiffusionModel, "unet_forward_controlled", counting)
    return seen


def _edit(image: str, out: Path, *extra: str, target: str = TGT) -> list[str]:
    return ["edit", image, "--source", SRC, "--target", target, *FAST, "--out", str(out), *extra]


@pytest.mark.parametrize(
    "extra, name, per_step",
    [
        ([], "P2P", 3),  # the default for direct: P2P refine, batch 3
        (["--control", "none"], "", 2),
        (
            [
                "--control",
                "p2p",
                "--edit",
                "replace",
                "--blend-words",
                "ball cube",
                "--blend-threshold",
                "0.9",
                "--reweight",
                "cube=2",
                "--reweight",
                "blue=0.5",
                "--cross-replace",
                '{"default_": 0.8, "cube": [0, 0.5]}',
                "--self-replace",
                "0:0.5",
            ],
            "P2P",
            3,
        ),
        (["--control", "masactrl", "--masa-step", "1", "--masa-layer", "2"], "MasaCtrl", 4),
        (
            [
                "--control",
                "pnp",
                "--pnp-feature-steps",
                "0.5",
                "--pnp-attention-steps",
                "0.25",
                "--negative-prompt",
                "blurry",
            ],
            "PnP",
            3,
        ),
    ],
)
def test_each_control_from_the_cli(image_path, tmp_path, capsys, forwards, extra, name, per_step):
    out = tmp_path / "out.png"
    assert cli.main(_edit(image_path, out, *extra)) == 0
    with Image.open(out) as img:
        assert img.size == (32, 32)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"pyinv: edited with direct{' + ' + name if name else ''} (4 steps)"), summary
    edit_forwards = forwards[4:]  # after the 4 inversion calls
    assert edit_forwards == [per_step] * 4


def test_control_when_editing_a_saved_inversion(image_path, tmp_path, capsys):
    inv = tmp_path / "ball.safetensors"
    assert cli.main(["invert", image_path, "--source", SRC, *FAST, "--method", "ddim", "--out", str(inv), "-q"]) == 0
    out = tmp_path / "cube.png"
    argv = ["edit", "--inversion", str(inv), "--target", TGT, "--control", "pnp", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "(ddim + PnP)" in capsys.readouterr().err
    assert out.exists()


def test_edict_defaults_to_no_control(image_path, tmp_path):
    out = tmp_path / "out.png"
    assert cli.main(_edit(image_path, out, "--method", "edict", "-q")) == 0


@pytest.mark.parametrize(
    "extra, target, expected",
    [
        (["--edit", "replace"], "a photo of a cube", "same number of words; the source has 6 and the target 5"),
        (["--blend-words", "ball dog"], TGT, "blend target word 'dog' is not in the prompt"),
        (["--blend-words", "cat cube"], TGT, "blend source word 'cat' is not in the prompt"),
        (["--blend-words", "ball"], TGT, '--blend-words takes "SRC TGT"'),
        (["--reweight", "dog=2"], TGT, "reweight word 'dog' is not in the prompt"),
        (["--reweight", "cube"], TGT, "--reweight takes WORD=SCALE"),
        (["--reweight", "cube=big"], TGT, "the scale must be a number"),
        (["--cross-replace", "1.2"], TGT, "outside [0, 1]"),
        (["--cross-replace", "0.8:0.2"], TGT, "starts after it ends"),
        (["--cross-replace", "{oops"], TGT, "not valid JSON"),
        (["--cross-replace", '{"dog": 0.3}'], TGT, "'dog' is not in the target"),
        (["--self-replace", "-0.5"], TGT, "outside [0, 1]"),
        (["--self-replace", "soon"], TGT, "--self-replace must be a fraction"),
        (["--edit", "reweight"], TGT, "needs words to reweight"),
        (["--blend-threshold", "0.5"], TGT, "need --blend-words"),
        (["--blend-threshold", "2"], TGT, "--blend-threshold"),
        (["--masa-step", "2"], TGT, "--masa-step applies to --control masactrl, not p2p"),
        (["--control", "masactrl", "--blend-words", "ball cube"], TGT, "--blend-words applies to --control p2p"),
        (["--control", "masactrl", "--masa-layer", "9"], TGT, "past the model's 7 self-attention layers"),
        (["--control", "masactrl", "--masa-step", "4"], TGT, "leaves nothing to control"),
        (["--control", "pnp", "--pnp-feature-steps", "1.5"], TGT, "--pnp-feature-steps"),
        (["--control", "magic"], TGT, "invalid choice"),
        (["--method", "edict", "--control", "p2p"], TGT, "edict runs its own coupled loop"),
    ],
)
def test_control_mistakes_are_one_line(image_path, tmp_path, capsys, forwards, extra, target, expected):
    out = tmp_path / "out.png"
    status = cli.main(_edit(image_path, out, *extra, target=target))
    line = assert_one_line_error(status, capsys, out)
    assert expected in line, line
    assert forwards == []  # caught before any UNet work
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_controls(capsys):
    assert cli.main(["edit", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--control", "masactrl", "--blend-words", "--reweight", "--pnp-feature-steps", "--masa-layer"):
        assert word in text
