"""Properties of the inversion methods on the tiny model (fp32, CPU)."""

import pytest
import torch
from conftest import rel_err

from pyinv import P2P, LocalBlend
from pyinv.control import Controller, ControlPlan
from pyinv.errors import PyinvError

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
STEPS = 20


class BlendTowardSource(Controller):
    """A test controller that reads the source's conditional pass and pulls the target
    halfway to the source after every step, so the target depends on the source branch."""

    reads_source = frozenset({"cond"})

    def plan(self, model, program, layout, context):
        return TowardSource()


class TowardSource(ControlPlan):
    def after_step(self, i, latents):
        latents = latents.clone()
        latents[1:] = 0.5 * (latents[1:] + latents[:1])
        return latents


@pytest.fixture(scope="module")
def ddim_inv(editor, image):
    return editor.invert(image, SRC, method="ddim", steps=STEPS)


def test_ddim_round_trip_close_at_guidance_1_and_worse_at_7_5(editor, ddim_inv):
    z0 = ddim_inv.z0
    err1 = rel_err(editor.reconstruct(ddim_inv, guidance=1.0).source_latents, z0)
    err75 = rel_err(editor.reconstruct(ddim_inv, guidance=7.5).source_latents, z0)
    assert err1 < 0.05
    assert err75 > 10 * err1


def test_ddim_trajectory_shape_and_start(ddim_inv):
    traj = ddim_inv["trajectory"]
    assert traj.shape[0] == STEPS + 1
    assert torch.equal(traj[0:1], ddim_inv.z0)


def test_direct_source_branch_returns_z0(editor, image):
    inv = editor.invert(image, SRC, method="direct", steps=STEPS)
    out = editor.edit(inv, TGT, with_source=True)
    assert (out.source_latents - inv.z0).abs().max().item() <= 1e-5


def ulps_of_z0(inv, ulps: int = 4) -> float:
    """``ulps`` roundings at the scale of ``z0`` in the model's latent dtype."""
    return ulps * torch.finfo(inv.z0.dtype).eps * inv.z0.abs().max().item()


@pytest.mark.parametrize("control", ["none", "p2p"])
def test_direct_offsets_source_returns_z0(editor, image, control):
    """The offsets form steps the source at full CFG (batch 4) and adds offsets computed from
    the same UNet call's source outputs, so each step lands on the pivot up to the rounding of
    ``s + (z* − s)`` and nothing carries over to the next step: in fp32 the source ends within a
    few ulps of ``z0`` (4 ulps of max|z0| allowed; offsets from a separate batch-2 pass left it
    9e-5 off after these 20 steps, and 3e-13 in fp64, growing with the steps)."""
    inv = editor.invert(image, SRC, method="direct", steps=STEPS, form="offsets")
    ctl = P2P(blend=LocalBlend("ball", "cube", threshold=0.97)) if control == "p2p" else None
    out = editor.edit(inv, TGT, control=ctl, with_source=True)
    assert len(out.batch_rows) == 4
    assert (out.source_latents - inv.z0).abs().max().item() <= ulps_of_z0(inv)


@pytest.mark.parametrize("dtype_tol", [("fp64", 1e-5), ("fp32", 1e-3)])
def test_direct_forms_agree(editor, editor64, image, dtype_tol):
    """Pinned source ≡ reference offsets. The targets agree to ``tol``: in fp32 the pinned
    edit (batch 3) and the offsets edit (batch 4) round differently on the CPU (≈1e-4), so the
    1e-5 check runs in fp64; both sources land on z0 to a few ulps."""
    dtype, tol = dtype_tol
    ed = editor64 if dtype == "fp64" else editor
    pinned = ed.invert(image, SRC, method="direct", steps=STEPS, form="pinned")
    offsets = ed.invert(image, SRC, method="direct", steps=STEPS, form="offsets")
    assert torch.equal(pinned["trajectory"], offsets["trajectory"])
    control = BlendTowardSource()
    a = ed.edit(pinned, TGT, control=control, with_source=True)
    b = ed.edit(offsets, TGT, control=control, with_source=True)
    assert torch.equal(a.source_latents, pinned.z0)
    assert (b.source_latents - offsets.z0).abs().max().item() <= ulps_of_z0(offsets)
    assert (a.latents - b.latents).abs().max().item() <= tol
    assert rel_err(a.latents, ed.edit(pinned, TGT).latents) > 1e-4  # the controller did couple them
    # the pinned form runs the source's conditional pass only: 3 rows, the reference 4
    assert len(a.batch_rows) == 3 and len(b.batch_rows) == 4
    # and without a controller reading the source, the pinned form drops the source entirely
    assert len(editor.edit(pinned, TGT).batch_rows) == 2


def test_direct_target_differs_from_source(editor, image):
    inv = editor.invert(image, SRC, method="direct", steps=STEPS)
    out = editor.edit(inv, TGT, with_source=True)
    assert rel_err(out.latents, out.source_latents) > 1e-3


def test_negative_prompt_reconstruction_equals_guidance_1_ddim(editor, image, ddim_inv):
    npi = editor.invert(image, SRC, method="negative-prompt", steps=STEPS)
    rec_npi = editor.reconstruct(npi, guidance=7.5).source_latents
    rec_ddim = editor.reconstruct(ddim_inv, guidance=1.0).source_latents
    assert (rec_npi - rec_ddim).abs().max().item() <= 1e-5


def test_negative_prompt_uses_source_as_negative(editor, image):
    npi = editor.invert(image, SRC, method="negative-prompt", steps=STEPS)
    ddim = editor.invert(image, SRC, method="ddim", steps=STEPS)
    assert rel_err(editor.edit(npi, TGT).latents, editor.edit(ddim, TGT).latents) > 1e-4


@pytest.fixture(scope="module")
def nti(editor, image):
    return editor.invert(image, SRC, method="null-text", steps=10, guidance=7.5)


def test_null_text_loss_falls(nti):
    first, last = nti.stats["loss_first"], nti.stats["loss_last"]
    assert len(first) == 10 and all(it >= 1 for it in nti.stats["inner_iterations"])
    falls = sum(b < a for a, b in zip(first, last, strict=True))
    assert falls >= 8
    assert sum(last) < sum(first)


def test_null_text_reconstruction_beats_ddim_at_7_5(editor, image, nti):
    ddim = editor.invert(image, SRC, method="ddim", steps=10)
    err_nti = rel_err(editor.reconstruct(nti, guidance=7.5).source_latents, nti.z0)
    err_ddim = rel_err(editor.reconstruct(ddim, guidance=7.5).source_latents, ddim.z0)
    assert err_nti < err_ddim


def test_null_text_embeddings_per_step(nti):
    nulls = nti["null_embeddings"]
    assert nulls.shape[0] == 10
    assert not torch.equal(nulls[0], nulls[-1])


def test_prompt_tuning_lowers_reconstruction_error(editor, image):
    pti = editor.invert(image, SRC, method="prompt-tuning", steps=10)
    ddim = editor.invert(image, SRC, method="ddim", steps=10)
    err_pti = rel_err(editor.reconstruct(pti, guidance=7.5).source_latents, pti.z0)
    err_ddim = rel_err(editor.reconstruct(ddim, guidance=7.5).source_latents, ddim.z0)
    assert err_pti < err_ddim
    assert sum(pti.stats["loss_last"]) < sum(pti.stats["loss_first"])


def test_prompt_tuning_without_source_prompt(editor, image):
    pti = editor.invert(image, "", method="prompt-tuning", steps=5, init_prompt=TGT)
    assert pti.options["init_prompt"] == TGT
    out = editor.edit(pti, TGT, eta=0.8)
    assert out.latents.shape == pti.z0.shape and torch.isfinite(out.latents).all()
    with pytest.raises(PyinvError):
        editor.invert(image, "", method="prompt-tuning", steps=5)
    with pytest.raises(PyinvError):
        editor.edit(pti, TGT, eta=1.5)


def test_prompt_tuning_eta_blends_target(editor64, image):
    pti = editor64.invert(image, SRC, method="prompt-tuning", steps=5)
    a = editor64.edit(pti, TGT, eta=0.0).latents
    rec = editor64.reconstruct(pti).source_latents
    assert (a - rec).abs().max().item() <= 1e-5  # η = 0: conditioning on c*_t alone
    b = editor64.edit(pti, TGT, eta=0.8).latents
    assert rel_err(b, a) > 1e-4


@pytest.mark.parametrize("method", ["ddim", "direct", "negative-prompt", "null-text"])
def test_batch_of_targets_equals_single_edits(editor64, image, method):
    opts = {"inner_steps": 2} if method == "null-text" else {}
    inv = editor64.invert(image, SRC, method=method, steps=8, **opts)
    both = editor64.edit(inv, [TGT, "a painting of a green tree"])
    one = editor64.edit(inv, TGT)
    two = editor64.edit(inv, "a painting of a green tree")
    assert len(both.images) == 2
    assert (both.latents[0:1] - one.latents).abs().max().item() <= 1e-5
    assert (both.latents[1:2] - two.latents).abs().max().item() <= 1e-5


def test_v_prediction_round_trip(editor_v, image):
    inv = editor_v.invert(image, SRC, method="ddim", steps=STEPS)
    err1 = rel_err(editor_v.reconstruct(inv, guidance=1.0).source_latents, inv.z0)
    err75 = rel_err(editor_v.reconstruct(inv, guidance=7.5).source_latents, inv.z0)
    assert err1 < 0.05 and err75 > err1  # v-prediction damps guidance at high noise: less drift
    direct = editor_v.invert(image, SRC, method="direct", steps=STEPS)
    assert (editor_v.edit(direct, TGT, with_source=True).source_latents - direct.z0).abs().max() <= 1e-5


def test_unet_counts(editor, image):
    inv = editor.invert(image, SRC, method="direct", steps=STEPS)
    assert inv.stats["unet_image_forwards"] == STEPS  # one conditional pass per inversion step
    out = editor.edit(inv, TGT)
    assert out.unet_calls == STEPS and out.unet_image_forwards == 2 * STEPS


def test_bad_options_are_clear_errors(editor, image, ddim_inv):
    with pytest.raises(PyinvError, match="unknown method"):
        editor.invert(image, SRC, method="magic")
    with pytest.raises(PyinvError, match="steps"):
        editor.invert(image, SRC, method="ddim", steps=0)
    with pytest.raises(PyinvError, match="guidance"):
        editor.edit(ddim_inv, TGT, guidance=-1)
    with pytest.raises(PyinvError, match="empty"):
        editor.edit(ddim_inv, "  ")
    with pytest.raises(PyinvError, match="empty"):
        editor.invert(image, "", method="direct")
    with pytest.raises(PyinvError, match="option"):
        editor.invert(image, SRC, method="ddim", form="pinned")
    with pytest.raises(PyinvError, match="form"):
        editor.invert(image, SRC, method="direct", steps=2, form="sideways")


def test_half_precision_model_optimises_in_fp32(image):
    """A bf16 model: NTI optimises on an fp32 UNet copy; latents and embeddings stay fp32."""
    import pyinv

    ed = pyinv.Editor.from_pretrained("tiny", dtype="bf16")
    inv = ed.invert(image, SRC, method="null-text", steps=4, inner_steps=3)
    assert ed.model.unet.dtype == torch.bfloat16 and ed.model.fp32_unet().dtype == torch.float32
    assert inv["null_embeddings"].dtype == torch.float32
    assert sum(inv.stats["loss_last"]) < sum(inv.stats["loss_first"])
    out = ed.edit(inv, TGT)
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()


def test_reconstruct_runs_the_source_branch_only(editor, ddim_inv, image):
    out = editor.reconstruct(ddim_inv, guidance=7.5)
    assert out.images == [] and out.source_image is not None
    assert out.unet_image_forwards == 2 * STEPS  # one branch, unconditional + conditional
    direct = editor.invert(image, SRC, method="direct", steps=STEPS)
    assert editor.reconstruct(direct).unet_image_forwards == 0  # pinned: the pivot itself
