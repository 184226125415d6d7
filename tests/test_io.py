"""Inversion files, model loading (presets, diffusers folders, pixel space) and image input."""

import json

import numpy as np
import pytest
import torch
from conftest import make_test_image
from PIL import Image
from safetensors.torch import load_file, save_file

import pyinv
from pyinv.errors import PyinvError
from pyinv.imageio import center_crop_resize, load_image, save_image
from pyinv.models import fingerprints_match, load_model, save_model

SRC, TGT = "a photo of a red ball", "a photo of a blue cube"


@pytest.fixture(scope="module")
def saved(editor, image, tmp_path_factory):
    inv = editor.invert(image, SRC, method="null-text", steps=4, inner_steps=2)
    path = tmp_path_factory.mktemp("inv") / "ball.safetensors"
    inv.save(path)
    return inv, path


def test_save_load_round_trip_edits_identically(editor, saved):
    inv, path = saved
    loaded = editor.load_inversion(path)
    assert loaded.method == "null-text" and loaded.source_prompt == SRC and loaded.num_steps == 4
    for name, tensor in inv.tensors.items():
        assert torch.equal(loaded[name], tensor)
    a, b = editor.edit(inv, TGT), editor.edit(loaded, TGT)
    assert torch.equal(a.latents, b.latents)
    # the file path works directly too, and one inversion serves many edits
    c = editor.edit(str(path), [TGT, "a photo of a green ball"])
    assert torch.allclose(c.latents[:1], a.latents, atol=1e-4)  # batch 2 vs 1: fp32 rounding only


def test_refuses_another_model(saved, editor_v):
    _, path = saved
    with pytest.raises(PyinvError, match="made with model 'tiny'"):
        editor_v.load_inversion(path)


def test_refuses_same_architecture_with_other_weights(saved):
    _, path = saved
    other = pyinv.Editor.from_pretrained("tiny")
    with torch.no_grad():
        other.model.unet.conv_in.weight.mul_(1.5)
    with pytest.raises(PyinvError, match="made with model"):
        other.load_inversion(path)


def test_fp16_load_of_same_model_matches(editor):
    half = load_model("tiny", dtype="bf16")
    assert fingerprints_match(editor.model.fingerprint(), half.fingerprint())


def test_fingerprint_is_computed_once_per_model(saved, monkeypatch):
    """An edit checks its inversion against the model; the weight sample is read back from
    the device once per model, not on every edit."""
    import pyinv.fingerprint
    import pyinv.models

    inv, _ = saved
    model = load_model("tiny")
    first = model.fingerprint()
    assert first == pyinv.fingerprint.fingerprint_of(model)  # the cached value is the fresh one

    def recompute(model):
        raise AssertionError("the fingerprint was computed again")

    monkeypatch.setattr(pyinv.models, "fingerprint_of", recompute)
    inv.check_model(model)
    inv.check_model(model)
    assert model.fingerprint() == first
    model.fingerprint()["weight_sample"][0] = 123.0  # a caller's copy: the cache is untouched
    assert model.fingerprint() == first


@pytest.mark.parametrize(
    "sample",
    [[1] * 16, [True] * 16, [10**400] * 16, [float("nan")] * 16, "x" * 16, None, [[0.0]] * 16],
)
def test_fingerprint_samples_of_a_wrong_kind_do_not_match(editor, sample):
    """A file's weight sample is untrusted: anything but 16 close numbers is no match, not a crash."""
    theirs = {**editor.model.fingerprint(), "weight_sample": sample}
    assert not fingerprints_match(theirs, editor.model.fingerprint())


def _rewrite_meta(src, dst, change):
    tensors = load_file(str(src))
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["pyinv"])
    change(meta)
    save_file(tensors, str(dst), metadata={"pyinv": json.dumps(meta)})


def test_refuses_newer_format(saved, editor, tmp_path):
    _, path = saved
    newer = tmp_path / "newer.safetensors"
    _rewrite_meta(path, newer, lambda m: m.update(format_version=99))
    with pytest.raises(PyinvError, match="newer"):
        editor.load_inversion(newer)


def test_refuses_missing_tensors_and_damaged_files(saved, editor, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del tensors["null_embeddings"]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), metadata=meta)
    with pytest.raises(PyinvError, match="null_embeddings"):
        editor.load_inversion(partial)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(PyinvError, match="not a pyinv inversion"):
        editor.load_inversion(junk)
    with pytest.raises(PyinvError, match="not found"):
        editor.load_inversion(tmp_path / "nope.safetensors")


def test_diffusers_folder_loads_like_the_preset(editor, saved, tmp_path):
    save_model(editor.model, str(tmp_path / "model"))
    folder = pyinv.Editor.from_pretrained(str(tmp_path / "model"))
    assert fingerprints_match(folder.model.fingerprint(), editor.model.fingerprint())
    assert folder.model.image_size == editor.model.image_size
    inv, _ = saved
    assert torch.allclose(folder.edit(inv, TGT).latents, editor.edit(inv, TGT).latents, atol=1e-6)


def test_unknown_models_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PyinvError, match="not found"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PyinvError, match="not a diffusers"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(PyinvError, match="dtype"):
        load_model("tiny", dtype="int8")
    with pytest.raises(PyinvError, match="device"):
        load_model("tiny", device="quantum")


def test_pixel_space_model(image):
    ed = pyinv.Editor.from_pretrained("tiny-pixel")
    assert ed.model.vae is None and ed.model.latent_channels == 3
    inv = ed.invert(image, SRC, method="direct", steps=6)
    assert inv.z0.shape == (1, 3, 16, 16)
    # without a VAE the latents are the pixels themselves
    assert torch.allclose(inv.z0, ed.prepare_image(image))
    out = ed.edit(inv, TGT, with_source=True)
    assert out.images[0].size == (16, 16)
    assert torch.equal(out.source_latents, inv.z0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_image_modes_convert_to_rgb(mode, tmp_path):
    base = make_test_image(40)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.frombytes("I;16", arr.shape[::-1], arr.astype("<u2").tobytes())
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    ext = ".tiff" if mode in ("CMYK", "I", "F") else ".png"
    path = tmp_path / f"img{ext}"
    img.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (40, 40)
    if mode in ("L", "I;16", "I"):
        # greyscale survives the conversion (16-bit rescaled, not clipped)
        grey = np.asarray(base.convert("L"), dtype=np.int32)
        assert np.abs(np.asarray(rgb)[..., 0].astype(np.int32) - grey).max() <= 1


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((3, 3)) == (255, 255, 255)


def test_center_crop_resize():
    img = Image.new("RGB", (60, 30))
    img.paste((255, 0, 0), (15, 0, 45, 30))  # the centre square is red
    out = center_crop_resize(img, 32)
    assert out.size == (32, 32)
    assert np.asarray(out)[..., 0].min() > 240


def test_outputs_written_atomically_with_normal_permissions(tmp_path):
    path = tmp_path / "out.png"
    save_image(make_test_image(16), path)
    assert Image.open(path).size == (16, 16)
    assert path.stat().st_mode & 0o044  # readable by others under the usual umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(PyinvError, match="unsupported output"):
        save_image(make_test_image(16), tmp_path / "out.xyz")
