"""Edits of different inversions sharing one UNet call per step (``Editor.edit_many``,
``loop.run_shared``, ``control.shared``): the same latents as separate edits, fewer calls."""

from __future__ import annotations

import pytest
import torch

import pyinv
from pyinv.control.base import StepControl
from pyinv.control.shared import merge, share_key
from tests.conftest import make_test_image

SRC_A, SRC_B = "a photo of a red ball", "a photo of a blue ball"
TARGETS_A = ["a painting of a red ball", "a photo of a green ball"]
TARGET_B = "a photo of a yellow ball"
STEPS = 4
LOOP_METHODS = ["ddim", "direct", "null-text", "negative-prompt", "prompt-tuning", "edit-friendly"]


def controls():
    return {
        "none": None,
        "p2p": pyinv.P2P(),
        "p2p-blend-reweight": pyinv.P2P(blend=("ball", "ball"), reweight={"ball": 2.0}),
        "p2p-replace": pyinv.P2P(edit="replace"),
        "masactrl": pyinv.MasaCtrl(start_step=1),
        "pnp": pyinv.PnP(),
    }


@pytest.fixture(scope="module")
def inversions(editor64):
    image = make_test_image()
    other = make_test_image(seed=3).transpose(0)  # another image: flipped, other noise
    out = {}
    for method in LOOP_METHODS + ["edict"]:
        options = {"inner_steps": 2} if method in ("null-text", "prompt-tuning") else {}
        a = editor64.invert(image, SRC_A, method=method, steps=STEPS, **options)
        b = editor64.invert(other, SRC_B, method=method, steps=STEPS, **options)
        out[method] = (a, b)
    return out


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max())


@pytest.mark.parametrize("method", LOOP_METHODS)
@pytest.mark.parametrize("kind", list(controls()))
def test_two_inversions_share_each_call_and_match_separate_edits(editor64, inversions, method, kind):
    if kind == "p2p-replace":  # replace needs prompts of one word count
        targets_a, target_b = ["a photo of a green ball", "a photo of a red cube"], "a photo of a blue cube"
    else:
        targets_a, target_b = TARGETS_A, TARGET_B
    control = controls()[kind]
    a, b = inversions[method]
    alone_a = editor64.edit(a, targets_a, control=control)
    alone_b = editor64.edit(b, target_b, control=control)
    before = editor64.model.unet_calls
    together = editor64.edit_many(
        [{"inversion": a, "target": targets_a, "control": control}, pyinv.EditSpec(b, target_b, control=control)]
    )
    calls = editor64.model.unet_calls - before
    assert calls == alone_a.unet_calls == alone_b.unet_calls  # one call per step for both edits
    assert together[0].unet_image_forwards == alone_a.unet_image_forwards
    assert max_diff(together[0].latents, alone_a.latents) <= 1e-12
    assert max_diff(together[1].latents, alone_b.latents) <= 1e-12
    assert [im.size for im in together[0].images] == [im.size for im in alone_a.images]
    assert together[1].prompts == [target_b]


def test_a_source_branch_and_three_edits(editor64, inversions):
    a, b = inversions["direct"]
    specs = [
        pyinv.EditSpec(a, TARGETS_A[0], control=pyinv.P2P(), with_source=True),
        pyinv.EditSpec(b, TARGET_B, control=pyinv.P2P()),
        pyinv.EditSpec(a, TARGETS_A[1], control=pyinv.P2P()),
    ]
    together = editor64.edit_many(specs)
    for spec, got in zip(specs, together, strict=True):
        alone = editor64.edit(spec.inversion, spec.target, control=spec.control, with_source=spec.with_source)
        assert max_diff(got.latents, alone.latents) <= 1e-12
        if spec.with_source:
            assert max_diff(got.source_latents, alone.source_latents) <= 1e-12
            assert got.source_image is not None


def test_edits_that_cannot_share_still_run_correctly(editor64, inversions):
    """Different controllers, a different step count and EDICT (its own loop) in one call:
    each edit as it is alone; only the edits that can share do."""
    a, b = inversions["direct"]
    c = editor64.invert(make_test_image(seed=5), SRC_A, method="direct", steps=STEPS + 1)
    e, _ = inversions["edict"]
    specs = [
        pyinv.EditSpec(a, TARGETS_A[0], control=pyinv.P2P()),
        pyinv.EditSpec(b, TARGET_B, control=pyinv.MasaCtrl(start_step=1)),
        pyinv.EditSpec(c, TARGETS_A[0], control=pyinv.P2P()),
        pyinv.EditSpec(e, TARGETS_A[0]),
        pyinv.EditSpec(a, TARGETS_A[1]),
    ]
    before = editor64.model.unet_calls
    together = editor64.edit_many(specs)
    calls = editor64.model.unet_calls - before
    alone = [editor64.edit(s.inversion, s.target, control=s.control) for s in specs]
    for got, ref in zip(together, alone, strict=True):
        assert max_diff(got.latents, ref.latents) <= 1e-12
    # P2P / MasaCtrl / none on a and b: 3 calls a step (the rules differ); c runs its own 5; EDICT its own
    assert calls == 3 * STEPS + (STEPS + 1) + alone[3].unet_calls


def test_bad_edits_are_refused_before_any_work(editor64, inversions):
    a, b = inversions["direct"]
    before = editor64.model.unet_calls
    with pytest.raises(pyinv.PyinvError, match="blend source word"):
        editor64.edit_many(
            [
                pyinv.EditSpec(a, TARGETS_A[0], control=pyinv.P2P(blend=("ball", "ball"))),
                pyinv.EditSpec(b, "a photo of a cube", control=pyinv.P2P(blend=("cube", "cube"))),
            ]
        )
    with pytest.raises(pyinv.PyinvError, match="unknown edit field"):
        editor64.edit_many([{"inversion": a, "target": "x", "guidanse": 3}])
    with pytest.raises(pyinv.PyinvError, match="EditSpec or a dict"):
        editor64.edit_many(["a photo"])
    assert editor64.model.unet_calls == before


def test_fp32_shared_calls_are_close(editor, image):
    a = editor.invert(image, SRC_A, method="direct", steps=STEPS)
    b = editor.invert(make_test_image(seed=3), SRC_B, method="direct", steps=STEPS)
    p2p = pyinv.P2P(blend=("ball", "ball"))
    together = editor.edit_many([pyinv.EditSpec(a, TARGETS_A, control=p2p), pyinv.EditSpec(b, TARGET_B, control=p2p)])
    for got, inv, target in ((together[0], a, TARGETS_A), (together[1], b, TARGET_B)):
        alone = editor.edit(inv, target, control=p2p)
        assert max_diff(got.latents, alone.latents) <= 1e-4


# ---------------------------------------------------------------------- the merge itself
def _p2p_steps(editor64, inversions, blend):
    """The step-2 controls of two P2P edits (2 targets and 1), planned as the loop plans them."""
    from pyinv import loop

    a, b = inversions["direct"]
    p2p = pyinv.P2P(blend=("ball", "ball") if blend else None)
    runs = []
    for inv, targets in ((a, TARGETS_A), (b, [TARGET_B])):
        job = pyinv.inversion.get_method("direct").edit_job(editor64.model, inv, targets, 7.5, p2p, False)
        runs.append(loop.EditRun(editor64.model, job.program, job.controller, job.context))
    return [r.call(2).control for r in runs], [r.layout.size for r in runs]


def test_merged_p2p_control_relabels_rows(editor64, inversions):
    (ca, cb), (ra, rb) = _p2p_steps(editor64, inversions, blend=True)
    assert share_key(ca) == share_key(cb) is not None
    merged, split = merge([ca, cb], [ra, rb])
    x = merged.inputs
    assert merged.rule.multi_source and merged.active == ca.active
    assert x["targets"].tolist() == ca.inputs["targets"].tolist() + (cb.inputs["targets"] + ra).tolist()
    src_a, src_b = ca.rule.source_cond, cb.rule.source_cond + ra
    assert x["sources"].tolist() == [src_a, src_b]
    assert x["target_source"].tolist() == [src_a, src_a, src_b]
    assert torch.equal(x["mix"], torch.cat([ca.inputs["mix"], cb.inputs["mix"]]))
    assert torch.equal(x["key_scale"], torch.cat([ca.inputs["key_scale"], cb.inputs["key_scale"]]))
    assert torch.equal(x["blend_source"][1], cb.inputs["blend_source"])
    maps = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # (E + T, n): sources, then targets
    got = split(maps)
    assert torch.equal(got[0], maps[[0, 2, 3]]) and torch.equal(got[1], maps[[1, 4]])


def test_share_keys_tell_what_may_share(editor64, inversions):
    (ca, _), _ = _p2p_steps(editor64, inversions, blend=True)
    (cn, _), _ = _p2p_steps(editor64, inversions, blend=False)
    assert share_key(None) == share_key(None) != share_key(ca)
    assert share_key(ca) != share_key(cn)  # LocalBlend's layers and inputs differ
    other_terms = StepControl(ca.rule, ca.inputs, frozenset())
    assert share_key(other_terms) != share_key(ca)
    with pytest.raises(pyinv.PyinvError, match="cannot share"):
        merge([ca, cn], [4, 3])

    class Opaque(type(ca.rule)):  # a rule that does not say how to share
        def share_identity(self):
            return None

    import dataclasses

    fields = {f.name: getattr(ca.rule, f.name) for f in dataclasses.fields(ca.rule)}
    assert share_key(StepControl(Opaque(**fields), ca.inputs, ca.active)) is None


# ---------------------------------------------------------------------- inversions together
@pytest.mark.parametrize("method", ["ddim", "direct", "negative-prompt"])
def test_pivot_inversions_share_each_call(editor64, method):
    images = [make_test_image(seed=k) for k in range(3)]
    prompts = [SRC_A, SRC_B, "a photo"]
    before = editor64.model.unet_calls
    together = editor64.invert_many(images, prompts, method=method, steps=STEPS)
    assert editor64.model.unet_calls - before == STEPS  # one call per step for all three
    for got, image, prompt in zip(together, images, prompts, strict=True):
        alone = editor64.invert(image, prompt, method=method, steps=STEPS)
        assert got.source_prompt == prompt and got.method == alone.method
        assert got.stats["unet_calls"] == alone.stats["unet_calls"] == STEPS
        assert sorted(got.tensors) == sorted(alone.tensors)
        for name in alone.tensors:
            assert max_diff(got[name], alone[name]) <= 1e-12


@pytest.mark.parametrize("method", ["null-text", "edit-friendly"])
def test_other_inversions_run_one_by_one_with_their_own_seeded_draws(editor64, method):
    images = [make_test_image(seed=k) for k in range(2)]
    options = {"inner_steps": 2} if method == "null-text" else {}
    together = editor64.invert_many(images, [SRC_A, SRC_B], method=method, steps=STEPS, seed=7, **options)
    for got, image, prompt in zip(together, images, [SRC_A, SRC_B], strict=True):
        alone = editor64.invert(image, prompt, method=method, steps=STEPS, seed=7, **options)
        for name in alone.tensors:
            assert torch.equal(got[name], alone[name])


def test_invert_many_refuses_bad_arguments_before_any_work(editor64):
    image = make_test_image()
    before = editor64.model.unet_calls
    with pytest.raises(pyinv.PyinvError, match="one prompt per image"):
        editor64.invert_many([image, image], [SRC_A])
    with pytest.raises(pyinv.PyinvError, match="list of prompts"):
        editor64.invert_many([image], SRC_A)
    with pytest.raises(pyinv.PyinvError, match="steps"):
        editor64.invert_many([image], [SRC_A], steps=0)
    assert editor64.model.unet_calls == before
    assert editor64.invert_many([], []) == []
