"""How each controller counts its step windows when an edit starts late (EF-DDPM's skip).

Each controller counts as its reference does:

- P2P: fractions of the schedule's N steps, counted in calls from the first step the edit
  runs (DDPM_inversion hands its P2P controller ``num_diffusion_steps`` and starts sampling at
  step ``skip``; the controller's ``cur_step`` starts at 0 there);
- PnP: schedule step indices (PnP-Inversion injects at ``scheduler.timesteps[:int(N·f)]``);
- MasaCtrl: calls of the edit (``cur_step`` per UNet call, ``step_idx = range(start_step, …)``).

A schedule of N = 10 steps edited from ``first_step = 4`` (6 calls) tells the countings apart.
"""

from __future__ import annotations

import pytest

from pyinv import P2P, LocalBlend, MasaCtrl, PnP
from pyinv.control.p2p import DEFAULT_CROSS_REPLACE, DEFAULT_SELF_REPLACE, SELF_REPLACE_MAX_TOKENS
from pyinv.control.pnp import DEFAULT_NEGATIVE_PROMPT
from pyinv.control.words import unknown_words

STEPS, SKIP = 10, 4
SOURCE, TARGET = "a photo of a red ball", "a photo of a blue ball"


class Recorder:
    """Mixin: records, per sampling step the loop runs, which of the controller's terms the
    step's control applies (``terms``), and keeps the edit's plan."""

    terms: tuple[str, ...] = ()

    def plan(self, *args):
        plan = super().plan(*args)
        step = plan.step
        self.log = getattr(self, "log", [])
        self.last_plan = plan

        def recorded(i):
            control = step(i)
            self.log.append((i, {term: term in control.active for term in self.terms}))
            return control

        plan.step = recorded
        return plan


class P2PRec(Recorder, P2P):
    terms = ("self", "cross")


class PnPRec(Recorder, PnP):
    terms = ("features", "attention")


class MasaRec(Recorder, MasaCtrl):
    terms = ("masa",)


class BlendRec(P2P):
    def plan(self, *args):
        plan = super().plan(*args)
        mask_of = plan.blend_mask

        def recorded(i, maps):
            mask = mask_of(i, maps)
            self.blended = getattr(self, "blended", []) + [i] * (mask is not None)
            return mask

        plan.blend_mask = recorded
        return plan


@pytest.fixture(scope="module")
def ef_inv(editor, image):
    return editor.invert(image, SOURCE, method="edit-friendly", steps=STEPS, seed=0)


def steps_with(log, key) -> list[int]:
    return [step for step, state in log if state[key]]


def test_p2p_windows_are_fractions_of_n_counted_from_the_first_step_run(editor, ef_inv):
    c = P2PRec(cross_replace=0.5, self_replace=0.4)
    editor.edit(ef_inv, TARGET, control=c, skip=SKIP)
    assert [s for s, _ in c.log] == list(range(SKIP, STEPS))
    # self: calls k < int(0.4·10) = 4 → steps 4..7 (schedule indices < 4 would be none)
    assert steps_with(c.log, "self") == [4, 5, 6, 7]
    # cross: calls k < int(0.5·(10+1)) = 5 → steps 4..8
    assert steps_with(c.log, "cross") == [4, 5, 6, 7, 8]
    c = P2PRec(cross_replace=(0.2, 0.5), self_replace=(0.1, 0.3))
    editor.edit(ef_inv, TARGET, control=c, skip=SKIP)
    assert steps_with(c.log, "self") == [SKIP + 1, SKIP + 2]  # calls [int(1.0), int(3.0))
    assert steps_with(c.log, "cross") == [SKIP + 2, SKIP + 3, SKIP + 4]  # calls [int(2.2), int(5.5))


def test_local_blend_start_counts_calls_from_the_first_step_run(editor, ef_inv):
    c = BlendRec(blend=LocalBlend("red", "blue", start=0.2))
    editor.edit(ef_inv, TARGET, control=c, skip=SKIP)
    assert c.blended == list(range(SKIP + int(0.2 * STEPS), STEPS))  # from call int(0.2·N) = 2


def test_pnp_windows_are_schedule_step_indices(editor, ef_inv):
    c = PnPRec(feature_steps=0.8, attention_steps=0.5)
    editor.edit(ef_inv, TARGET, control=c, skip=SKIP)
    assert steps_with(c.log, "features") == [4, 5, 6, 7]  # indices < int(0.8·10) = 8, not 6 calls
    assert steps_with(c.log, "attention") == [4]  # indices < 5
    c = PnPRec(feature_steps=0.3, attention_steps=0.3)
    editor.edit(ef_inv, TARGET, control=c, skip=SKIP)
    assert steps_with(c.log, "features") == steps_with(c.log, "attention") == []


def test_masactrl_start_step_counts_calls_of_the_edit(editor, ef_inv):
    c = MasaRec(start_step=2)
    editor.edit(ef_inv, TARGET, control=c, skip=SKIP)
    assert steps_with(c.log, "masa") == list(range(SKIP + 2, STEPS))  # calls 2.., not indices ≥ 2
    c = MasaRec(start_step=2)
    editor.edit(ef_inv, TARGET, control=c, skip=0)
    assert steps_with(c.log, "masa") == list(range(2, STEPS))


def test_p2p_default_windows_follow_the_method(editor, image, ef_inv):
    """EF-DDPM + P2P defaults to DDPM_inversion's 0.6 / 0.2 with self-attention replaced at ≤ 16²
    queries; the other methods to P2P's own 0.8 / 0.4 at ≤ 32². Given windows are kept."""
    c = P2PRec()
    editor.edit(ef_inv, TARGET, control=c, skip=0)
    assert steps_with(c.log, "self") == list(range(int(0.2 * STEPS)))
    assert steps_with(c.log, "cross") == list(range(int(0.6 * (STEPS + 1))))
    assert c.last_plan.self_max_tokens == 16 * 16
    direct = editor.invert(image, SOURCE, method="direct", steps=STEPS)
    editor.edit(direct, TARGET, control=c)  # the same controller object, another method
    assert c.log[-STEPS:] == [
        (s, {"self": s < int(DEFAULT_SELF_REPLACE * STEPS), "cross": s < int(DEFAULT_CROSS_REPLACE * (STEPS + 1))})
        for s in range(STEPS)
    ]
    assert c.last_plan.self_max_tokens == SELF_REPLACE_MAX_TOKENS
    c = P2PRec(cross_replace=0.8, self_replace=0.4)
    editor.edit(ef_inv, TARGET, control=c, skip=0)
    assert steps_with(c.log, "self") == list(range(4))


def test_pnp_reference_negative_prompt_only_where_the_model_knows_its_words(editor):
    demo_like = editor.model.tokenizer  # tiny: a closed vocabulary without "ugly", "blurry", …
    assert "ugly" in unknown_words(demo_like, DEFAULT_NEGATIVE_PROMPT)
    assert PnP().resolved_negative_prompt(demo_like) is None
    assert PnP(negative_prompt="a blurry cat").resolved_negative_prompt(demo_like) == "a blurry cat"  # explicit
    assert PnP(negative_prompt=None).resolved_negative_prompt(demo_like) is None

    class OpenVocabulary:
        def get_vocab(self):
            return {f"tok{i}": i for i in range(49408)}

    assert unknown_words(OpenVocabulary(), DEFAULT_NEGATIVE_PROMPT) == []
    assert PnP().resolved_negative_prompt(OpenVocabulary()) == DEFAULT_NEGATIVE_PROMPT


def test_pnp_feature_layer_keeps_its_place_in_smaller_unets():
    """SD's ``up_blocks.1.resnets.1`` is the second ResNet of the first decoder block with
    attention, at a quarter of the latent's side; a UNet with fewer levels gets the same place."""
    from diffusers import UNet2DConditionModel

    from pyinv.control.pnp import reference_feature_layer
    from pyinv.shapes.model import demo_unet

    sd_like = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    assert reference_feature_layer(sd_like) == "up_blocks.1.resnets.1"
    assert reference_feature_layer(demo_unet()) == "up_blocks.0.resnets.1"  # 8² of 32², as SD's 16² of 64²
