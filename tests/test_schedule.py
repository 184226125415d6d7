"""The diffusion math: schedules, parameterisations and steps."""

import math
import warnings

import pytest
import torch

import pyinv
from pyinv.errors import PyinvError
from pyinv.kernels.guided_step import guided_step_reference
from pyinv.presets import SD_SCHEDULER_CONFIG
from pyinv.schedule import ddim_step, ddpm_mean, make_schedule, split_prediction


def _references_pipeline_scheduler(model, scheduler, vae=None):
    """The scheduler as the references' code ends up running it: handed to a
    ``StableDiffusionPipeline`` made from the model's parts (whose constructor rewrites
    ``steps_offset`` to 1)."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline's deprecation notice about steps_offset
        pipe = StableDiffusionPipeline(
            vae=model.vae if model.vae is not None else vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe.scheduler


def _references_ddim():
    """google/prompt-to-prompt's and PnP Inversion's own scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )


def _assert_same_schedule(ours, theirs, n):
    theirs.set_timesteps(n)
    assert list(ours.timesteps) == [int(t) for t in theirs.timesteps]
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod.to(torch.float64))
    # the references' inversion starts from the level below the last timestep (their next_step
    # with timestep − T/N < 0 takes final_alpha_cumprod); pyinv's DDIM inversion does the same
    first = ours.timesteps[-1]
    assert ours.prev_timestep(first) == first - theirs.config.num_train_timesteps // n < 0
    assert ours.alpha(ours.prev_timestep(first)) == float(theirs.final_alpha_cumprod)
    for t in ours.timesteps:
        prev = t - theirs.config.num_train_timesteps // theirs.num_inference_steps
        assert ours.prev_timestep(t) == prev


@pytest.mark.parametrize("n", [5, 10, 50])
def test_reference_schedule_is_what_the_references_pipeline_runs(editor, n):
    theirs = _references_pipeline_scheduler(editor.model, _references_ddim())
    assert theirs.config.steps_offset == 1  # the pipeline's rewrite the references run under
    ours = make_schedule(editor.model.scheduler_config, n, "reference")
    _assert_same_schedule(ours, theirs, n)
    if n == 50:
        assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1
    if n == 5:
        assert ours.timesteps == (801, 601, 401, 201, 1)


@pytest.mark.parametrize("n", [5, 10, 50])
def test_reference_schedule_on_the_demo_models_own_config(editor, n):
    from diffusers import DDIMScheduler

    demo = pyinv.Editor.from_pretrained("demo").model
    assert demo.scheduler_config["steps_offset"] == 0  # its own config: the rewrite matters here too
    # the demo model works in pixel space; older pipelines need some VAE to be built at all
    theirs = _references_pipeline_scheduler(demo, DDIMScheduler.from_config(demo.scheduler_config), editor.model.vae)
    _assert_same_schedule(make_schedule(demo.scheduler_config, n, "reference"), theirs, n)


def test_checkpoint_schedule_is_the_checkpoints_own_ddim_scheduler():
    """EF-DDPM's reference loads the checkpoint's scheduler config into a DDIMScheduler itself
    (no pipeline rewrite); pyinv's edit-friendly default is that schedule."""
    from diffusers import DDIMScheduler

    from pyinv.inversion import get_method

    algo = get_method("edit-friendly")
    assert algo.default_schedule == "checkpoint" and algo.default_steps == 100
    for config in (SD_SCHEDULER_CONFIG, pyinv.Editor.from_pretrained("demo").model.scheduler_config):
        theirs = DDIMScheduler.from_config(config)
        _assert_same_schedule(make_schedule(config, 100, algo.default_schedule), theirs, 100)
    assert make_schedule(SD_SCHEDULER_CONFIG, 100, "checkpoint").timesteps[:2] == (991, 981)


def test_other_spacings_are_named_for_what_they_are():
    leading = make_schedule(SD_SCHEDULER_CONFIG, 50, "leading")
    assert leading.timesteps[0] == 980 and leading.timesteps[-1] == 0
    trailing = make_schedule(SD_SCHEDULER_CONFIG, 50, "trailing")
    assert trailing.timesteps[0] == 999 and trailing.timesteps[-1] == 19
    assert make_schedule(SD_SCHEDULER_CONFIG, 50, "checkpoint").timesteps[0] == 981  # SD's own steps_offset=1
    for s in (leading, trailing):
        assert s.alpha(-1) == pytest.approx(float(s.alphas_cumprod[0]))  # set_alpha_to_one=False


def test_an_inversion_file_from_before_the_schedule_fix_still_edits(editor, image, tmp_path):
    """Files that recorded ``mode="reference"`` with 980 … 0 are rebuilt as ``leading``."""
    inv = editor.invert(image, "a photo of a cat", method="ddim", steps=4, schedule="leading")
    inv.schedule["mode"] = "reference"
    inv.save(tmp_path / "old.safetensors")
    old = editor.load_inversion(tmp_path / "old.safetensors")
    out = editor.edit(old, "a photo of a dog")
    assert out.unet_calls == 4 and old.schedule["timesteps"] == [750, 500, 250, 0]


def test_scaled_linear_betas():
    s = make_schedule(SD_SCHEDULER_CONFIG, 10)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0)
    assert torch.allclose(s.alphas_cumprod, expected, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3])
def test_steps_must_be_positive(bad):
    with pytest.raises(ValueError):
        make_schedule(SD_SCHEDULER_CONFIG, bad)


def test_unknown_mode():
    with pytest.raises(ValueError, match="reference, checkpoint, leading, trailing"):
        make_schedule(SD_SCHEDULER_CONFIG, 10, "sideways")


@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.97])
def test_v_prediction_conversions_are_consistent(alpha):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    z = math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * eps
    v = math.sqrt(alpha) * eps - math.sqrt(1 - alpha) * x0
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        x0_hat, eps_hat = split_prediction(out, z, alpha, kind)
        assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_ddim_step_is_invertible_for_fixed_eps():
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    up = ddim_step(eps, z, 0.9, 0.3, "epsilon")
    back = ddim_step(eps, up, 0.3, 0.9, "epsilon")
    assert torch.allclose(back, z, atol=1e-5)


def test_ddpm_mean_with_zero_sigma_is_ddim():
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    assert torch.allclose(ddpm_mean(eps, z, 0.4, 0.7, 0.0, "epsilon"), ddim_step(eps, z, 0.4, 0.7, "epsilon"))


def test_ddpm_sigma_formula():
    s = make_schedule(SD_SCHEDULER_CONFIG, 20, "checkpoint")
    _, a_t, a_s = s.step_alphas(3)
    assert s.ddpm_sigma(3) ** 2 == pytest.approx((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))


@pytest.mark.parametrize("v_pred", [False, True])
def test_guided_step_reference_matches_unfused_math(v_pred):
    g = torch.Generator().manual_seed(3)
    z, u, c = (torch.randn(3, 4, 5, 7, generator=g) for _ in range(3))
    w = torch.tensor([1.0, 7.5, 3.0])
    out = guided_step_reference(z, u, c, w, 0.3, 0.6, v_pred)
    kind = "v_prediction" if v_pred else "epsilon"
    for b in range(3):
        m = u[b] + w[b] * (c[b] - u[b])
        assert torch.allclose(out[b], ddim_step(m, z[b], 0.3, 0.6, kind), atol=1e-5)
    pin = torch.randn(3, 4, 5, 7, generator=g)
    pinned = guided_step_reference(z, u, c, w, 0.3, 0.6, v_pred, pin=pin, pin_mask=torch.tensor([True, False, False]))
    assert torch.equal(pinned[0], pin[0]) and torch.allclose(pinned[1:], out[1:])


def test_pyinv_error_is_a_value_error():
    assert issubclass(PyinvError, ValueError)
