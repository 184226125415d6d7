"""Edit-friendly DDPM inversion (EF-DDPM, arXiv 2304.06140) on the tiny random-weight models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyinv
from pyinv.errors import PyinvError
from pyinv.inversion import METHODS, get_method
from pyinv.inversion.edit_friendly import ColorEdit, EditFriendlyInversion, default_skip

STEPS = 10
SOURCE = "a photo of a cat"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return float((a - b).norm() / b.norm())


def synthetic_image(size: int = 32) -> np.ndarray:
    """A smooth colour gradient with a red disc, ``(size, size, 3)`` uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.8 - 0.5 * xx * yy], axis=-1)
    img[(xx - 0.55) ** 2 + (yy - 0.45) ** 2 < 0.06] = [0.9, 0.2, 0.1]
    return (img * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ef_editor() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny")


@pytest.fixture(scope="module")
def ef_inv(ef_editor):
    return ef_editor.invert(synthetic_image(), SOURCE, method="edit-friendly", steps=STEPS, seed=0)


def test_registered_after_direct_with_reference_defaults():
    names = list(METHODS)
    assert names.index("edit-friendly") == names.index("direct") + 1
    algo = get_method("ef-ddpm")
    assert isinstance(algo, EditFriendlyInversion)
    assert (algo.default_steps, algo.default_guidance, algo.default_inversion_guidance) == (100, 15.0, 3.5)
    assert algo.default_schedule == "checkpoint" and algo.edit_options["skip"] is None
    assert default_skip(100) == 36 and default_skip(50) == 18  # T_skip = 36 of 100, scaled
    assert not algo.needs_source_prompt


def test_inversion_record(ef_editor, ef_inv):
    n = STEPS
    assert ef_inv.method == "edit-friendly"
    assert ef_inv.guidance == 3.5  # cfg_src, not the edit's default 15
    assert ef_inv.schedule["mode"] == "checkpoint" and ef_inv.schedule["timesteps"][-1] == 1  # SD's steps_offset=1
    assert ef_inv["xts"].shape == (n + 1, 4, 16, 16) and ef_inv["noise_maps"].shape == (n, 4, 16, 16)
    assert ef_inv.stats["unet_calls"] == n and ef_inv.stats["unet_image_forwards"] == 2 * n
    assert relative(ef_inv["xts"][:1], ef_inv.z0) < 1e-5  # index 0 is x_0 (re-set to float rounding)
    assert ef_inv["noise_maps"][-1].abs().max() > 0  # the last map is kept, not zeroed


def test_other_methods_keep_their_inversion_guidance(ef_editor):
    inv = ef_editor.invert(synthetic_image(), SOURCE, method="ddim", steps=3)
    assert inv.guidance == get_method("ddim").default_guidance == 7.5
    ef = ef_editor.invert(synthetic_image(), SOURCE, method="edit-friendly", steps=3, guidance=2.0, seed=0)
    assert ef.guidance == 2.0


def test_reconstructs_x0_source_branch_and_equal_target(ef_editor, ef_inv):
    out = ef_editor.edit(ef_inv, SOURCE, guidance=ef_inv.guidance, with_source=True, skip=0)
    z0 = ef_inv.z0
    assert relative(out.source_latents, z0) < 1e-4
    assert relative(out.latents, z0) < 1e-4
    assert out.unet_calls == STEPS and out.unet_image_forwards == 4 * STEPS


def test_reconstructs_v_prediction():
    editor = pyinv.Editor.from_pretrained("tiny-v")
    assert editor.model.prediction_type == "v_prediction"
    inv = editor.invert(synthetic_image(), SOURCE, method="edit-friendly", steps=STEPS, seed=1)
    out = editor.edit(inv, "a photo of a dog", with_source=True, skip=0)
    assert relative(out.source_latents, inv.z0) < 1e-4
    assert relative(out.latents, inv.z0) > 1e-2  # the target really is another image


def test_empty_source_prompt_reconstructs(ef_editor):
    inv = ef_editor.invert(synthetic_image(), "", method="edit-friendly", steps=STEPS, seed=2)
    out = ef_editor.reconstruct(inv, skip=0)
    assert relative(out.source_latents, inv.z0) < 1e-4


def test_levels_are_independent_draws_not_a_chain(ef_editor, ef_inv):
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε_t with independent ε_t: the ε of consecutive levels are
    uncorrelated (in a diffusion chain they are strongly correlated)."""
    from pyinv.inversion.base import schedule_of

    schedule = schedule_of(ef_editor.model, ef_inv)
    xts, z0, n = ef_inv["xts"], ef_inv.z0[0], STEPS
    eps = []
    for k in range(1, n + 1):
        a = schedule.alpha(schedule.timesteps[n - k])
        eps.append(((xts[k] - math.sqrt(a) * z0) / math.sqrt(1.0 - a)).flatten())
    eps = torch.stack(eps)
    assert torch.allclose(eps.std(dim=1), torch.ones(n), atol=0.15)
    corr = torch.corrcoef(eps)
    consecutive = torch.diagonal(corr, offset=1)
    assert consecutive.abs().max() < 0.15, consecutive


def test_seeds_give_different_inversions_that_all_reconstruct(ef_editor, ef_inv):
    again = ef_editor.invert(synthetic_image(), SOURCE, method="edit-friendly", steps=STEPS, seed=0)
    assert torch.equal(again["noise_maps"], ef_inv["noise_maps"])
    other = ef_editor.invert(synthetic_image(), SOURCE, method="edit-friendly", steps=STEPS, seed=7)
    assert relative(other["noise_maps"], ef_inv["noise_maps"]) > 0.5
    out = ef_editor.edit(other, SOURCE, guidance=other.guidance, skip=0)
    assert relative(out.latents, other.z0) < 1e-4


def test_edit_with_another_prompt_differs_from_source(ef_editor, ef_inv):
    out = ef_editor.edit(ef_inv, ["a photo of a dog", "a painting of a cat"], with_source=True, skip=2)
    assert relative(out.source_latents, ef_inv.z0) < 1e-4  # the source still reconstructs in the batch
    for target in out.latents:
        assert relative(target[None], ef_inv.z0) > 1e-2
    assert relative(out.latents[:1], out.latents[1:]) > 1e-3
    assert len(out.images) == 2


def test_skip_starts_later_and_still_reconstructs(ef_editor, ef_inv):
    for skip in (0, 4, STEPS - 1):
        out = ef_editor.edit(ef_inv, SOURCE, guidance=ef_inv.guidance, skip=skip)
        assert out.unet_calls == STEPS - skip
        # the tail of the trajectory from the stored x at that level is the same trajectory
        assert relative(out.latents, ef_inv.z0) < 1e-4
    late = ef_editor.edit(ef_inv, "a photo of a dog", skip=6).latents
    early = ef_editor.edit(ef_inv, "a photo of a dog", skip=1).latents
    assert relative(late, ef_inv.z0) < relative(early, ef_inv.z0)  # skipping more keeps more of the image


def test_image_shift(ef_editor, ef_inv):
    kw = {"guidance": ef_inv.guidance, "skip": 2}
    plain = ef_editor.edit(ef_inv, SOURCE, **kw).latents
    assert torch.equal(ef_editor.edit(ef_inv, SOURCE, shift=0, **kw).latents, plain)
    assert torch.equal(ef_editor.edit(ef_inv, SOURCE, shift=(0, 0), **kw).latents, plain)
    horizontal = ef_editor.edit(ef_inv, SOURCE, shift=3, **kw).latents
    assert torch.equal(ef_editor.edit(ef_inv, SOURCE, shift=(0, 3), **kw).latents, horizontal)
    out = ef_editor.edit(ef_inv, SOURCE, shift=(2, -3), with_source=True, **kw)
    moved = torch.roll(ef_inv.z0, shifts=(2, -3), dims=(-2, -1))
    # the image moves: the result is much closer to the shifted image than to the original
    assert relative(out.latents, moved) < 0.6 * relative(out.latents, ef_inv.z0)
    assert relative(out.source_latents, ef_inv.z0) < 1e-4  # the source branch is not shifted


def test_colour_manipulation_moves_x0_toward_target_inside_mask(ef_editor, ef_inv):
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    colour = torch.full((4, 16, 16), 2.0)
    kw = {"guidance": ef_inv.guidance, "skip": 2, "with_source": True}
    plain = ef_editor.edit(ef_inv, SOURCE, **kw)
    out = ef_editor.edit(ef_inv, SOURCE, color={"mask": mask, "target": colour, "strength": 0.3}, **kw)
    gain = (plain.latents - colour).abs() - (out.latents - colour).abs()  # > 0: closer to M
    inside, outside = gain[..., :8].mean(), gain[..., 8:].abs().mean()
    assert inside > 0.5 and inside > 5 * outside
    assert relative(out.source_latents, ef_inv.z0) < 1e-4  # only target branches are coloured
    as_dataclass = ef_editor.edit(ef_inv, SOURCE, color=ColorEdit(mask[None, None], colour[None], 0.3), **kw)
    assert torch.allclose(as_dataclass.latents, out.latents)
    zero = ef_editor.edit(ef_inv, SOURCE, color={"mask": mask, "target": colour, "strength": 0.0}, **kw)
    assert torch.allclose(zero.latents, plain.latents, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"skip": -1},
        {"skip": STEPS},
        {"skip": 2.5},
        {"skip": True},
        {"skip": "3"},
        {"skip": 0, "shift": "left"},
        {"skip": 0, "shift": (1, 2, 3)},
        {"skip": 0, "shift": (0.5, 1)},
        {"skip": 0, "shift": (0, 16)},
        {"skip": 0, "color": 3},
        {"skip": 0, "color": {"mask": torch.ones(16, 16)}},
        {"skip": 0, "color": {"mask": torch.ones(16, 16), "target": torch.zeros(4, 16, 16), "hue": 1}},
        {"skip": 0, "color": {"mask": torch.ones(8, 8), "target": torch.zeros(4, 16, 16)}},
        {"skip": 0, "color": {"mask": torch.ones(16, 16), "target": torch.zeros(3, 16, 16)}},
        {"skip": 0, "color": {"mask": torch.ones(16, 16), "target": torch.zeros(4, 16, 16), "strength": -1}},
        {"skip": 0, "color": {"mask": 2 * torch.ones(16, 16), "target": torch.zeros(4, 16, 16)}},
        {"skip": 0, "eta": 0.5},
    ],
)
def test_bad_options_raise(ef_editor, ef_inv, options):
    with pytest.raises(PyinvError):
        ef_editor.edit(ef_inv, "a photo of a dog", **options)


def test_save_load_roundtrip_edits_identically(ef_editor, ef_inv, tmp_path):
    path = tmp_path / "cat.ef.safetensors"
    ef_inv.save(path)
    loaded = ef_editor.load_inversion(path)
    assert (loaded.method, loaded.guidance, loaded.num_steps) == ("edit-friendly", 3.5, STEPS)
    for name in ("z0", "xts", "noise_maps"):
        assert torch.equal(loaded[name], ef_inv[name])
    a = ef_editor.edit(ef_inv, "a photo of a dog", skip=3, shift=1).latents
    b = ef_editor.edit(loaded, "a photo of a dog", skip=3, shift=1).latents
    c = ef_editor.edit(str(path), "a photo of a dog", skip=3, shift=1).latents
    assert torch.equal(a, b) and torch.equal(a, c)


def test_leading_spacing_has_a_deterministic_last_step(ef_editor):
    """With steps_offset=0 the last step goes from level 0 to the final level ᾱ_0: σ = 0, so
    its noise map is 0 and sampling reproduces the stored last latent, which is x_0 plus a
    little noise of level 0."""
    inv = ef_editor.invert(synthetic_image(), SOURCE, method="edit-friendly", steps=STEPS, schedule="leading", seed=3)
    assert inv.schedule["timesteps"][-1] == 0
    assert torch.count_nonzero(inv["noise_maps"][-1]) == 0
    out = ef_editor.edit(inv, SOURCE, guidance=inv.guidance, skip=0)
    assert relative(out.latents, inv["xts"][:1]) < 1e-4
    assert 1e-3 < relative(out.latents, inv.z0) < 0.1
