"""``vae=`` / ``--vae``: a VAE in place of the model's own (an fp16-fixed SDXL VAE, say),
from a VAE folder, a model folder's ``vae/``, and the refusals."""

from __future__ import annotations

import pytest
import torch

import pyinv
from pyinv import cli
from pyinv.errors import PyinvError
from pyinv.models import load_model
from pyinv.presets import _tiny_vae

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE folder of the tiny model's shape with other (seeded) weights."""
    folder = tmp_path_factory.mktemp("vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        vae = _tiny_vae()
    vae.save_pretrained(folder)
    return vae, folder


def test_the_given_vae_replaces_the_models_own(other_vae):
    vae, folder = other_vae
    model = load_model("tiny", vae=str(folder))
    own = load_model("tiny")
    for mine, given in zip(model.vae.state_dict().values(), vae.state_dict().values(), strict=True):
        assert torch.equal(mine, given)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.decode(z), own.decode(z))
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(model.decode(z), want, atol=1e-6)
    # the UNet and text encoder are the model's
    assert torch.equal(model.unet.conv_out.weight, own.unet.conv_out.weight)


def test_a_model_folders_vae_and_the_editor(other_vae, tmp_path):
    _vae, folder = other_vae
    whole = tmp_path / "model"
    pyinv.models.save_model(load_model("tiny", vae=str(folder)), str(whole))
    editor = pyinv.Editor.from_pretrained("tiny", vae=str(whole))  # its vae/ subfolder
    assert editor.model.vae.config.scaling_factor == 3.0
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(editor.model.decode(z), load_model("tiny", vae=str(folder)).decode(z))


def test_vaes_that_cannot_stand_in_are_refused(other_vae, tmp_path):
    _vae, folder = other_vae
    with pytest.raises(PyinvError, match="no VAE to replace"):
        load_model("tiny-pixel", vae=str(folder))
    with pytest.raises(PyinvError, match="VAE folder not found"):
        load_model("tiny", vae=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PyinvError, match="not a diffusers VAE folder"):
        load_model("tiny", vae=str(tmp_path / "empty"))
    from diffusers import AutoencoderKL

    wide = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=8,
    )  # fmt: skip
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(PyinvError, match="8-channel latents"):
        load_model("tiny", vae=str(tmp_path / "wide"))
    deep = AutoencoderKL(
        block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    deep.save_pretrained(tmp_path / "deep")
    with pytest.raises(PyinvError, match="downsamples 4×"):
        load_model("tiny", vae=str(tmp_path / "deep"))


def test_cli_generate_with_a_vae(other_vae, tmp_path, capsys):
    _vae, folder = other_vae
    out = tmp_path / "out.png"
    assert (
        cli.main(["generate", PROMPT, "--model", "tiny", "--vae", str(folder), "--steps", "2", "--out", str(out), "-q"])
        == 0
    )
    assert out.is_file()
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    status = cli.main(["generate", PROMPT, "--model", "tiny", "--vae", str(tmp_path / "nope"), "--out", str(bad)])
    _out, err = capsys.readouterr()
    assert status != 0 and "Traceback" not in err and not bad.exists()
    assert err.strip().splitlines() == [err.strip()] and "VAE folder not found" in err
