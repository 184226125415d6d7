"""EDICT (arXiv 2211.12446): exact inversion, options, batching, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pyinv
from pyinv.control import Controller, NoControl
from pyinv.inversion import get_method
from pyinv.inversion.edict import EDICTInversion

PROMPT = "a photo of a cat"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def editor() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def inv10(editor, image):
    """Default options (strength 0.8: 8 of 10 steps), guidance 3."""
    return editor.invert(image, PROMPT, method="edict", steps=10)


def test_registered_with_reference_defaults():
    method = get_method("edict")
    assert isinstance(method, EDICTInversion)
    assert method.default_steps == 50 and method.default_guidance == 3.0
    assert method.invert_options == {"mixing": 0.93, "leapfrog": True, "strength": 0.8}


def test_stores_the_pair_and_options(editor, inv10):
    z0 = inv10.z0
    assert inv10.method == "edict"
    assert inv10["edict_x"].shape == inv10["edict_y"].shape == z0.shape
    assert inv10.options == {"mixing": 0.93, "leapfrog": True, "strength": 0.8}
    # the two sequences really are distinct after inversion (the coupling is not trivial)
    assert rel(inv10["edict_x"], inv10["edict_y"]) > 1e-3


def test_exact_where_ddim_drifts(editor, image):
    """Full strength, w = 3: EDICT returns z0 to float rounding; DDIM at the same w does not."""
    w, steps = 3.0, 12
    inv = editor.invert(image, PROMPT, method="edict", steps=steps, guidance=w, strength=1.0)
    edict_err = rel(editor.reconstruct(inv, guidance=w).source_latents, inv.z0)
    ddim = editor.invert(image, PROMPT, method="ddim", steps=steps)
    ddim_err = rel(editor.reconstruct(ddim, guidance=w).source_latents, ddim.z0)
    assert edict_err < 1e-4
    assert ddim_err > 100 * edict_err


@pytest.mark.parametrize(
    "guidance, leapfrog, strength",
    [(7.5, True, 0.8), (3.0, False, 0.8), (3.0, True, 0.9)],  # 0.9 of 10: an odd number of steps
)
def test_exact_for_guidance_leapfrog_and_step_parity(editor, image, guidance, leapfrog, strength):
    inv = editor.invert(
        image, PROMPT, method="edict", steps=10, guidance=guidance, leapfrog=leapfrog, strength=strength
    )
    out = editor.edit(inv, PROMPT, guidance=guidance)
    assert rel(out.latents, inv.z0) < 1e-4


def test_v_prediction_exact(image):
    ed = pyinv.Editor.from_pretrained("tiny-v", device="cpu", dtype="fp32")
    inv = ed.invert(image, PROMPT, method="edict", steps=10, guidance=3.0)
    assert rel(ed.edit(inv, PROMPT, guidance=3.0).latents, inv.z0) < 1e-4


def test_float64_exact_to_double_rounding(image):
    """The residual in fp32 is rounding alone: in float64 the round trip is exact to ~1e-15."""
    ed = pyinv.Editor.from_pretrained("tiny", device="cpu", dtype="fp64")
    inv = ed.invert(image, PROMPT, method="edict", steps=6, guidance=7.5, strength=1.0)
    out = ed.edit(inv, PROMPT, guidance=7.5)
    assert inv["edict_x"].dtype == out.latents.dtype == torch.float64
    assert rel(out.latents, inv.z0) < 1e-12


def test_strength_sets_the_number_of_steps(editor, image, inv10):
    # 10 steps at strength 0.8: 8 steps, two UNet calls (one per half-step) each way
    assert inv10.stats["unet_calls"] == 16
    assert editor.edit(inv10, "a photo of a dog").unet_calls == 16
    full = editor.invert(image, PROMPT, method="edict", steps=10, strength=1.0, guidance=1.0)
    assert full.stats["unet_calls"] == 20
    assert full.stats["unet_image_forwards"] == 20  # guidance 1: conditional rows only
    assert editor.edit(full, "a photo of a dog", guidance=1.0).unet_calls == 20


def test_several_targets_in_one_batch_equal_single_calls(editor, inv10):
    targets = ["a photo of a dog", "a photo of a fox"]
    both = editor.edit(inv10, targets, guidance=3.0, with_source=True)
    # branch 0 is the source; one UNet call per half-step for all branches, uncond rows first
    assert both.batch_rows == ((0, "uncond"), (1, "uncond"), (2, "uncond"), (0, "cond"), (1, "cond"), (2, "cond"))
    assert both.unet_calls == 16 and both.unet_image_forwards == 16 * 6
    for k, prompt in enumerate(targets):
        single = editor.edit(inv10, prompt, guidance=3.0)
        assert single.batch_rows == ((0, "uncond"), (0, "cond"))
        assert torch.allclose(both.latents[k : k + 1], single.latents, atol=1e-5, rtol=0)
    assert rel(both.source_latents, inv10.z0) < 1e-4
    assert rel(both.latents[0], inv10.z0[0]) > 1e-2  # the edit changes the image
    assert rel(both.latents[0], both.latents[1]) > 1e-3


def test_source_branch_runs_at_the_inversion_guidance(editor, inv10):
    out = editor.edit(inv10, "a photo of a dog", guidance=7.5, with_source=True)
    assert rel(out.source_latents, inv10.z0) < 1e-4


class _Reader(Controller):
    reads_source = frozenset({"cond"})


class _Silent(Controller):
    pass


@pytest.mark.parametrize("control", [_Reader(), _Silent()])
def test_attention_control_is_refused(editor, inv10, control):
    with pytest.raises(pyinv.PyinvError, match="EDICT does not support attention control"):
        editor.edit(inv10, "a photo of a dog", control=control)


def test_no_control_is_accepted(editor, inv10):
    plain = editor.edit(inv10, "a photo of a dog")
    explicit = editor.edit(inv10, "a photo of a dog", control=NoControl())
    assert torch.equal(plain.latents, explicit.latents)


def test_save_load_roundtrip(editor, inv10, tmp_path):
    path = tmp_path / "cat.edict.safetensors"
    inv10.save(path)
    loaded = editor.load_inversion(path)
    assert loaded.method == "edict" and loaded.options == inv10.options
    assert torch.equal(loaded["edict_x"], inv10["edict_x"]) and torch.equal(loaded["edict_y"], inv10["edict_y"])
    a = editor.edit(inv10, ["a photo of a dog", "a photo of a fox"])
    b = editor.edit(str(path), ["a photo of a dog", "a photo of a fox"])
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mixing": 0.0}, "mixing must be a number in \\(0, 1\\)"),
        ({"mixing": 1.0}, "mixing must be a number in \\(0, 1\\)"),
        ({"mixing": "0.9"}, "mixing must be a number in \\(0, 1\\)"),
        ({"strength": 0.0}, "strength must be a number in \\(0, 1\\]"),
        ({"strength": 1.5}, "strength must be a number in \\(0, 1\\]"),
        ({"leapfrog": "yes"}, "leapfrog must be True or False"),
        ({"strength": 0.05}, "leaves no step to run"),
        ({"mix": 0.9}, "no inversion option"),
    ],
)
def test_bad_options(editor, image, options, message):
    with pytest.raises(pyinv.PyinvError, match=message):
        editor.invert(image, PROMPT, method="edict", steps=10, **options)
