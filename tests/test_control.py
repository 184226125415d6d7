"""Attention control: fused path = explicit-softmax reference, batch layouts, composition,
clean install/remove, bounded memory, and clear errors."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from control_reference import ExplicitMasaCtrl, ExplicitP2P, ExplicitPnP

import pyinv
from pyinv import P2P, LocalBlend, MasaCtrl, PnP, loop
from pyinv.control.attention import ControlledAttention, controlled_modules
from pyinv.control.base import EditContext
from pyinv.errors import PyinvError
from pyinv.inversion import get_method
from pyinv.inversion.base import schedule_of

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
STEPS = 8

#: name → (fast controller factory, explicit factory, target prompt)
CASES = {
    "replace": (lambda: P2P(edit="replace"), lambda: ExplicitP2P(edit="replace"), TGT),
    "refine": (lambda: P2P(edit="refine"), lambda: ExplicitP2P(edit="refine"), "a photo of a big blue cube"),
    "refine+reweight": (
        lambda: P2P(edit="refine", reweight={"cube": 2.0}),
        lambda: ExplicitP2P(edit="refine", reweight={"cube": 2.0}),
        "a photo of a blue cube",
    ),
    "reweight": (
        lambda: P2P(edit="reweight", reweight={"ball": 3.0}),
        lambda: ExplicitP2P(edit="reweight", reweight={"ball": 3.0}),
        SRC,
    ),
    "localblend": (
        lambda: P2P(edit="replace", blend=LocalBlend("ball", "cube", threshold=0.97)),
        lambda: ExplicitP2P(edit="replace", blend=LocalBlend("ball", "cube", threshold=0.97)),
        TGT,
    ),
    "masactrl": (lambda: MasaCtrl(start_step=2), lambda: ExplicitMasaCtrl(start_step=2), TGT),
    "pnp": (lambda: PnP(), lambda: ExplicitPnP(), TGT),
}


@pytest.fixture(scope="module")
def inv_v(editor_v, image):
    return editor_v.invert(image, SRC, method="direct", steps=STEPS)


@pytest.fixture(scope="module")
def inv64(editor64, image):
    return editor64.invert(image, SRC, method="direct", steps=STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_control_matches_explicit_softmax_fp32(editor_v, inv_v, case):
    """≤ 1e-5 max abs on the final latents in fp32 (tiny-v: on the ε model fp32 rounding of
    plain attention alone reaches 1e-5 at w = 7.5, so the fp64 test below checks it)."""
    fast, explicit, target = CASES[case]
    out = editor_v.edit(inv_v, target, control=fast())
    ref = editor_v.edit(inv_v, target, control=explicit())
    swap = editor_v.edit(inv_v, target)
    assert (out.latents - ref.latents).abs().max() <= 1e-5
    assert (out.latents - swap.latents).abs().max() > 1e-3  # the control changes the edit


@pytest.mark.parametrize("case", list(CASES))
def test_fused_control_matches_explicit_softmax_fp64(editor64, inv64, case):
    fast, explicit, target = CASES[case]
    out = editor64.edit(inv64, target, control=fast())
    ref = editor64.edit(inv64, target, control=explicit())
    assert (out.latents - ref.latents).abs().max() <= 1e-10


def test_graph_static_mode_gives_the_same_edit(editor64, inv64):
    for make in (
        lambda s: P2P(blend=LocalBlend("ball", "cube", threshold=0.97), graph_static=s),
        lambda s: MasaCtrl(start_step=3, graph_static=s),
        lambda s: PnP(graph_static=s),
    ):
        a = editor64.edit(inv64, TGT, control=make(False)).latents
        b = editor64.edit(inv64, TGT, control=make(True)).latents
        assert (a - b).abs().max() <= 1e-10


def test_local_blend_keeps_the_source_outside_the_mask(editor_v, inv_v):
    masks = []

    class Spy(P2P):
        def plan(self, *args):
            plan = super().plan(*args)
            original = plan.blend_mask

            def spy(i, maps):
                mask = original(i, maps)
                masks.append(mask)
                return mask

            plan.blend_mask = spy
            return plan

    control = Spy(blend=LocalBlend("ball", "cube", threshold=0.97))
    out = editor_v.edit(inv_v, TGT, control=control, with_source=True)
    assert masks[0] is None and masks[-1] is not None  # blending starts at int(0.2·N)
    assert sum(m is None for m in masks) == int(0.2 * STEPS)
    last = masks[-1][1, 0].bool()
    assert 0.05 < last.float().mean() < 0.95  # a real region, not all or nothing
    outside = ~last.expand_as(out.latents[0])
    assert torch.equal(out.latents[0][outside], out.source_latents[0][outside])
    assert not torch.equal(out.latents[0][~outside], out.source_latents[0][~outside])


def test_batch_of_targets_equals_separate_edits(editor64, inv64):
    targets = [TGT, "a photo of a green cube"]
    make = lambda: P2P(edit="replace", blend=("ball", "cube"), reweight={"cube": 1.5})  # noqa: E731
    both = editor64.edit(inv64, targets, control=make()).latents
    for k, target in enumerate(targets):
        one = editor64.edit(inv64, target, control=make()).latents
        assert (both[k] - one[0]).abs().max() <= 1e-10


# ---------------------------------------------------------------------- batch layouts
@pytest.mark.parametrize(
    "method, control, per_step, rows",
    [
        ("direct", None, 2, [(0, "uncond"), (0, "cond")]),  # no source branch at all
        ("direct", P2P, 3, [(1, "uncond"), (0, "cond"), (1, "cond")]),
        ("direct", MasaCtrl, 4, [(0, "uncond"), (1, "uncond"), (0, "cond"), (1, "cond")]),
        ("direct", PnP, 3, [(0, "uncond"), (1, "uncond"), (1, "cond")]),
        ("ddim", P2P, 4, [(0, "uncond"), (1, "uncond"), (0, "cond"), (1, "cond")]),
        ("ddim", PnP, 4, [(0, "uncond"), (1, "uncond"), (0, "cond"), (1, "cond")]),
    ],
)
def test_image_forwards_per_step(editor, image, method, control, per_step, rows):
    inv = editor.invert(image, SRC, method=method, steps=STEPS)
    out = editor.edit(inv, TGT, control=control() if control else None)
    assert out.unet_image_forwards == per_step * STEPS
    assert out.unet_calls == STEPS
    assert [tuple(r) for r in out.batch_rows] == rows


def test_batch_3_pinned_equals_reference_batch_4_offsets(editor64, image):
    pinned = editor64.invert(image, SRC, method="direct", steps=STEPS)
    offsets = editor64.invert(image, SRC, method="direct", steps=STEPS, form="offsets")
    control = lambda: P2P(blend=LocalBlend("ball", "cube", threshold=0.97))  # noqa: E731
    a = editor64.edit(pinned, "a photo of a big blue cube", control=control())
    b = editor64.edit(offsets, "a photo of a big blue cube", control=control())
    assert a.unet_image_forwards == 3 * STEPS and b.unet_image_forwards == 4 * STEPS
    assert (a.latents - b.latents).abs().max() <= 1e-8


# ---------------------------------------------------------------------- composition
P2P_METHODS = {
    "ddim": {},
    "null-text": {"inner_steps": 2},
    "negative-prompt": {},
    "prompt-tuning": {"inner_steps": 2},
    "direct": {},
    "edit-friendly": {},
}


@pytest.mark.parametrize("method", list(P2P_METHODS))
def test_every_method_composes_with_p2p(editor, image, method):
    steps = 10 if method == "edit-friendly" else 6
    inv = editor.invert(image, SRC, method=method, steps=steps, **P2P_METHODS[method])
    control = P2P(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0})
    out = editor.edit(inv, "a photo of a big blue cube", control=control)
    swap = editor.edit(inv, "a photo of a big blue cube")
    assert torch.isfinite(out.latents).all()
    assert (out.latents - swap.latents).abs().max() > 1e-3
    assert out.unet_calls == swap.unet_calls  # the same number of steps, one UNet call each


@pytest.mark.parametrize("method", ["ddim", "direct"])
@pytest.mark.parametrize("control", [MasaCtrl, PnP])
def test_ddim_and_direct_compose_with_masactrl_and_pnp(editor, image, method, control):
    inv = editor.invert(image, SRC, method=method, steps=6)
    out = editor.edit(inv, TGT, control=control())
    swap = editor.edit(inv, TGT)
    assert torch.isfinite(out.latents).all()
    assert (out.latents - swap.latents).abs().max() > 1e-3


def test_pnp_with_ddim_runs_the_source_as_the_guidance_1_reconstruction(editor64, image):
    """The reference's DDIM + PnP source is the conditional reconstruction (w = 1)."""
    inv = editor64.invert(image, SRC, method="ddim", steps=6)
    out = editor64.edit(inv, TGT, control=PnP(), with_source=True)
    rec = editor64.reconstruct(inv, guidance=1.0)
    assert (out.source_latents - rec.source_latents).abs().max() <= 1e-10


def test_edict_refuses_attention_control(editor, image):
    inv = editor.invert(image, SRC, method="edict", steps=4)
    with pytest.raises(PyinvError, match="attention control"):
        editor.edit(inv, TGT, control=P2P())


# ---------------------------------------------------------------------- the model does not change
def test_the_model_is_the_same_before_during_and_after_edits(editor, image):
    """Processors and hooks are installed once per model; an edit (any controller) changes
    neither, at any step."""
    unet = editor.model.unet
    before, hooks = controlled_modules(unet)
    assert all(isinstance(p, ControlledAttention) for p in before.values())
    inv = editor.invert(image, SRC, method="direct", steps=4)
    seen = []

    def check(i, latents):
        now, count = controlled_modules(unet)
        seen.append(count == hooks and all(now[name] is proc for name, proc in before.items()))

    for control in (P2P(blend=("ball", "cube")), MasaCtrl(start_step=1), PnP()):
        editor.edit(inv, TGT, control=control)
        loop_run_with(editor, inv, control, check)
    after, count = controlled_modules(unet)
    assert seen and all(seen)
    assert count == hooks and all(after[name] is proc for name, proc in before.items())


def _program(editor, inv):
    """The edit program of ``inv`` towards ``TGT`` at w = 7.5, with the source branch."""
    method = get_method(inv.method)
    schedule = schedule_of(editor.model, inv)
    return method.program(editor.model, inv, schedule, [TGT], 7.5, True, method.edit_options_of({}))


def loop_run_with(editor, inv, control, on_step):
    """Run ``control``'s edit of ``inv`` through the loop with ``on_step`` told every step."""
    method = get_method(inv.method)
    model = editor.model
    program = _program(editor, inv)
    if control is not None:
        program = control.prepare(model, program, inv.source_prompt, [TGT])
    context = EditContext(inv.source_prompt, (TGT,), method.control_defaults)
    return loop.run(model, program, control, context, on_step=on_step)


def test_a_failing_edit_leaves_the_model_as_it_was(editor, image):
    class Boom(PnP):
        def plan(self, *args):
            plan = super().plan(*args)
            step = plan.step

            def failing(i):
                if i == 2:
                    raise RuntimeError("boom")
                return step(i)

            plan.step = failing
            return plan

    unet = editor.model.unet
    before, hooks = controlled_modules(unet)
    inv = editor.invert(image, SRC, method="direct", steps=4)
    with pytest.raises(RuntimeError, match="boom"):
        editor.edit(inv, TGT, control=Boom())
    after, count = controlled_modules(unet)
    assert count == hooks and all(after[name] is proc for name, proc in before.items())
    assert torch.equal(editor.edit(inv, TGT, control=PnP()).latents, editor.edit(inv, TGT, control=PnP()).latents)


def test_a_controller_object_can_be_reused(editor64, inv64):
    control = P2P(blend=LocalBlend("ball", "cube", threshold=0.97))
    a = editor64.edit(inv64, TGT, control=control).latents
    b = editor64.edit(inv64, TGT, control=control).latents
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- memory
def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module attributes warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                    total += obj.untyped_storage().nbytes()
            except Exception:  # noqa: BLE001 - objects that refuse introspection are not ours
                continue
    return total


class _Census(P2P):
    """P2P whose plan records the bytes of all live tensors after every step."""

    def plan(self, *args):
        plan = super().plan(*args)

        def after_step(i, latents):
            self.census.append(_live_tensor_bytes())
            return latents

        plan.after_step = after_step
        return plan


def test_nothing_accumulates_per_step_or_outlives_the_edit(editor, image):
    """Peak memory grows with the batch, not with steps × layers: the live tensors after
    each step stay flat, and after the edit the controller holds no per-edit tensor."""
    inv = editor.invert(image, SRC, method="direct", steps=12)
    control = _Census(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0})
    control.census = []
    editor.edit(inv, TGT, control=control)
    steady = control.census[2:]  # after the first calls (lazy caches, blend sum) it must be flat
    assert max(steady) - min(steady) < 16 * 1024, control.census
    held = [k for k, v in vars(control).items() if isinstance(v, torch.Tensor) and k.startswith("_")]
    assert held == [], held


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, target, message",
    [
        (lambda: P2P(edit="replace"), "a photo of a big blue cube", "same number of words.*refine"),
        (lambda: P2P(blend=("ball", "dog")), TGT, "blend target word 'dog' is not in the prompt"),
        (lambda: P2P(blend=("cube", "cube")), TGT, "blend source word 'cube' is not in the prompt 'a photo of a red"),
        (lambda: P2P(reweight={"dog": 2.0}), TGT, "reweight word 'dog' is not in the prompt"),
        (lambda: P2P(cross_replace={"default_": 0.8, "dog": 0.3}), TGT, "'dog' is not in the target"),
        (lambda: MasaCtrl(start_step=8), TGT, "leaves nothing to control"),
        (lambda: PnP(feature_layer="up_blocks.9.resnets.1"), TGT, "not a module of this UNet"),
        (lambda: PnP(feature_layer="up_blocks.1.attentions.0"), TGT, "not a ResNet block"),
        (lambda: PnP(attention_layers=["up_blocks.0"]), TGT, "not self-attention layers"),
    ],
)
def test_clear_errors_at_edit_time(editor_v, inv_v, make, target, message):
    with pytest.raises(PyinvError, match=message):
        editor_v.edit(inv_v, target, control=make())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: P2P(edit="swap"), "unknown P2P edit"),
        (lambda: P2P(edit="reweight"), "needs words to reweight"),
        (lambda: P2P(cross_replace=1.2), "outside"),
        (lambda: P2P(cross_replace=(0.6, 0.2)), "starts after it ends"),
        (lambda: P2P(self_replace=-0.1), "outside"),
        (lambda: P2P(cross_replace={"default_": 0.5, "cube": (0, 3)}), "outside"),
        (lambda: P2P(reweight={"cube": "big"}), "must be a number"),
        (lambda: LocalBlend("ball", "cube", threshold=1.5), "threshold must be a number in"),
        (lambda: LocalBlend("ball", "cube", start=-1), "start must be a number in"),
        (lambda: LocalBlend("", "cube"), "blend source words"),
        (lambda: P2P(blend="ball"), "pair"),
        (lambda: MasaCtrl(start_step=-1), "non-negative integer"),
        (lambda: PnP(feature_steps=2), "outside"),
        (lambda: PnP(negative_prompt=3), "negative prompt must be a string"),
    ],
)
def test_clear_errors_at_construction(make, message):
    with pytest.raises(PyinvError, match=message):
        make()


def test_pie_bench_preset_edits(editor_v, inv_v):
    control = P2P.pie_bench("ball", "cube")
    assert (control.edit, control.cross_replace, control.self_replace) == ("refine", 0.4, 0.6)
    assert control.reweight == {"cube": 2.0} and control.blend.source_words == ("ball",)
    out = editor_v.edit(inv_v, TGT, control=control)
    assert out.unet_image_forwards == 3 * STEPS and torch.isfinite(out.latents).all()


def test_controllers_are_exported_at_top_level():
    assert pyinv.P2P is P2P and pyinv.MasaCtrl is MasaCtrl and pyinv.PnP is PnP and pyinv.LocalBlend is LocalBlend


# ---------------------------------------------------------------------- no device syncs per step
class _DeviceReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor reads that make the host wait for the device (``item``, ``bool``,
    ``tolist``, ``cpu``, …). On a CPU machine every tensor is a host tensor, so any such read
    inside the step loop would be a synchronisation on a GPU."""

    READS = {
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
    }

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "method, make",
    [
        ("direct", lambda: P2P(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0})),
        ("direct", lambda: MasaCtrl(start_step=1)),
        ("direct", lambda: PnP()),
        ("direct", lambda: None),
        ("null-text", lambda: P2P()),
        ("edit-friendly", lambda: P2P(blend=("ball", "cube"))),
    ],
)
def test_no_device_reads_between_steps(editor, image, method, make):
    """From the end of the first step to the end of the edit, the loop, the plan and the
    processors read nothing back from the device."""
    options = {"inner_steps": 2} if method == "null-text" else {}
    inv = editor.invert(image, SRC, method=method, steps=6, seed=0, **options)
    control = make()
    mode = _DeviceReads()
    first = _program(editor, inv).first_step

    def after_first(i, latents):
        if i == first:
            mode.__enter__()

    with torch.no_grad():
        try:
            loop_run_with(editor, inv, control, after_first)
        finally:
            mode.__exit__(None, None, None)
    assert mode.reads == []
    with mode:  # the counter sees a read when there is one
        bool(torch.ones(1).any())
    assert mode.reads == ["__bool__"]
