"""The diffusion math: schedules, parameterisations and steps."""

import math

import pytest
import torch

from pyinv.errors import PyinvError
from pyinv.kernels.guided_step import guided_step_reference
from pyinv.presets import SD_SCHEDULER_CONFIG
from pyinv.schedule import ddim_step, ddpm_mean, make_schedule, split_prediction


def test_reference_spacing_matches_the_papers_code():
    s = make_schedule(SD_SCHEDULER_CONFIG, 50, "reference")
    assert s.timesteps[0] == 980 and s.timesteps[-1] == 0 and len(s.timesteps) == 50
    assert s.prev_timestep(980) == 960
    # set_alpha_to_one=False: the level below t = 0 has ᾱ = alphas_cumprod[0]
    assert s.alpha(-20) == pytest.approx(float(s.alphas_cumprod[0]))


def test_checkpoint_spacing_keeps_steps_offset():
    s = make_schedule(SD_SCHEDULER_CONFIG, 50, "checkpoint")
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1


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
    with pytest.raises(ValueError):
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
