"""The diffusion math, in one place: noise levels, parameterisations, DDIM and DDPM steps.

Notation (METHODS.md): ``ᾱ_t = alphas_cumprod[t]``; the level "before t = 0" has
``ᾱ = final_alpha`` (``alphas_cumprod[0]`` when ``set_alpha_to_one=False``).

- ε-prediction:  ``x̂0 = (z_t − √(1−ᾱ_t) ε) / √ᾱ_t``
- v-prediction:  ``x̂0 = √ᾱ_t z_t − √(1−ᾱ_t) v``,  ``ε = √ᾱ_t v + √(1−ᾱ_t) z_t``
- DDIM step t → s:  ``z_s = √ᾱ_s x̂0 + √(1−ᾱ_s) ε``   (DDIM, arXiv 2010.02502, eq. 12, η = 0)
- DDPM step t → s (η = 1):  ``z_s = √ᾱ_s x̂0 + √(1−ᾱ_s−σ_t²) ε + σ_t z``
  with ``σ_t² = (1−ᾱ_s)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_s)``.

The betas and the timestep spacing come from diffusers' ``DDIMScheduler`` built from the
checkpoint's scheduler config; this module only turns them into step coefficients.
All coefficients are Python floats computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

PredictionType = Literal["epsilon", "v_prediction"]
SpacingMode = Literal["reference", "checkpoint", "leading", "trailing"]

#: Overrides that turn any SD scheduler config into the references' DDIM schedule.
#: google/prompt-to-prompt and PnP Inversion build ``DDIMScheduler(beta_start=0.00085,
#: beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)``
#: (``steps_offset=0``) and hand it to ``StableDiffusionPipeline``, whose constructor rewrites
#: ``steps_offset`` to 1. So they run at 981, 961, …, 1 for 50 steps (801, 601, 401, 201, 1
#: for 5), and the inversion's first step starts from ``alphas_cumprod[0]``.
REFERENCE_OVERRIDES: dict[str, Any] = {
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
}

#: The other spacings, named for what they are (the betas stay the checkpoint's):
#: ``leading``: ``k·(T/N)`` with no offset (980, 960, …, 0 for 50 steps);
#: ``trailing``: ``T − 1 − k·(T/N)`` counted from the top (999, 979, …, 19).
SPACING_OVERRIDES: dict[str, dict[str, Any]] = {
    "reference": REFERENCE_OVERRIDES,
    "checkpoint": {},
    "leading": {**REFERENCE_OVERRIDES, "steps_offset": 0},
    "trailing": {**REFERENCE_OVERRIDES, "steps_offset": 0, "timestep_spacing": "trailing"},
}

#: The accepted ``schedule=`` values, the default first.
SCHEDULE_MODES: tuple[str, ...] = tuple(SPACING_OVERRIDES)


@dataclass(frozen=True)
class Schedule:
    """A discretised noise schedule for ``N`` inference steps.

    Attributes:
        alphas_cumprod: ``ᾱ`` for every training timestep, float64, shape ``(T,)``.
        timesteps: the N inference timesteps in sampling order (descending).
        final_alpha: ``ᾱ`` of the level after the last step (below ``timesteps[-1]``).
        prediction_type: what the UNet predicts, ``"epsilon"`` or ``"v_prediction"``.
        config: the scheduler settings this schedule was built from (for metadata).
    """

    alphas_cumprod: torch.Tensor
    timesteps: tuple[int, ...]
    final_alpha: float
    prediction_type: PredictionType = "epsilon"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def step_ratio(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000)) // self.num_steps

    def alpha(self, t: int) -> float:
        """``ᾱ`` at timestep ``t``; ``t < 0`` is the final level."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def prev_timestep(self, t: int) -> int:
        """The level one sampling step below ``t`` (may be negative: the final level)."""
        return t - self.step_ratio

    def step_alphas(self, i: int) -> tuple[int, float, float]:
        """For sampling step ``i`` (0 = noisiest): ``(t, ᾱ_t, ᾱ_prev(t))``."""
        t = self.timesteps[i]
        return t, self.alpha(t), self.alpha(self.prev_timestep(t))

    def ddpm_sigma(self, i: int) -> float:
        """``σ_t`` of the DDPM (η = 1) step ``i``: ``σ² = (1−ᾱ_s)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_s)``."""
        _, a_t, a_s = self.step_alphas(i)
        return math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))

    def to_metadata(self) -> dict[str, Any]:
        return {
            "timesteps": list(self.timesteps),
            "final_alpha": self.final_alpha,
            "prediction_type": self.prediction_type,
            "config": {k: v for k, v in self.config.items() if not k.startswith("_")},
        }


def make_schedule(
    scheduler_config: dict[str, Any],
    num_steps: int,
    mode: SpacingMode = "reference",
) -> Schedule:
    """Build the ``num_steps``-step schedule from a diffusers scheduler config.

    ``mode="reference"`` applies :data:`REFERENCE_OVERRIDES` (what the papers' code runs:
    981, 961, …, 1 for 50 steps); ``mode="checkpoint"`` keeps the checkpoint's own spacing;
    ``"leading"`` and ``"trailing"`` are the other spacings (:data:`SPACING_OVERRIDES`).
    Whatever the spacing, ``prev(t) = t − T/N`` (diffusers' DDIM step).
    """
    from diffusers import DDIMScheduler

    if num_steps <= 0:
        raise ValueError(f"the number of steps must be positive, got {num_steps}")
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if mode not in SPACING_OVERRIDES:
        raise ValueError(f"unknown schedule {mode!r} (use one of {', '.join(SCHEDULE_MODES)})")
    config.update(SPACING_OVERRIDES[mode])
    config["clip_sample"] = False
    train_steps = int(config.get("num_train_timesteps", 1000))
    if num_steps > train_steps:
        raise ValueError(f"at most {train_steps} steps are possible, got {num_steps}")
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    if int(scheduler.timesteps.max()) >= train_steps:  # e.g. 1000 steps shifted by steps_offset 1
        raise ValueError(
            f"{num_steps} steps do not fit the {mode} spacing (its first timestep would be "
            f"{int(scheduler.timesteps.max())}, past the model's {train_steps - 1}); use fewer steps"
        )
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    final = float(scheduler.final_alpha_cumprod)
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction type {prediction!r}")
    kept = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return Schedule(
        alphas_cumprod=alphas,
        timesteps=tuple(int(t) for t in scheduler.timesteps),
        final_alpha=final,
        prediction_type=prediction,
        config=kept,
    )


def split_prediction(
    model_output: torch.Tensor,
    z_t: torch.Tensor,
    alpha_t: float,
    prediction_type: PredictionType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂0, ε)`` from the UNet output at level ``ᾱ_t`` (both parameterisations)."""
    sa, sb = math.sqrt(alpha_t), math.sqrt(1.0 - alpha_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (z_t - sb * eps) / sa
    elif prediction_type == "v_prediction":
        x0 = sa * z_t - sb * model_output
        eps = sa * model_output + sb * z_t
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    return x0, eps


def ddim_step(
    model_output: torch.Tensor,
    z_t: torch.Tensor,
    alpha_t: float,
    alpha_s: float,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """Deterministic DDIM move from level ``ᾱ_t`` to ``ᾱ_s`` (either direction).

    ``z_s = √ᾱ_s x̂0 + √(1−ᾱ_s) ε``. With ``ᾱ_s > ᾱ_t`` it denoises; with ``ᾱ_s < ᾱ_t``
    it is the inversion step. Shapes: any, broadcast together.
    """
    x0, eps = split_prediction(model_output, z_t, alpha_t, prediction_type)
    return math.sqrt(alpha_s) * x0 + math.sqrt(1.0 - alpha_s) * eps


def ddpm_mean(
    model_output: torch.Tensor,
    z_t: torch.Tensor,
    alpha_t: float,
    alpha_s: float,
    sigma: float,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """DDPM posterior mean ``μ̂_t = √ᾱ_s x̂0 + √(1−ᾱ_s−σ_t²) ε`` (EF-DDPM, arXiv 2304.06140)."""
    x0, eps = split_prediction(model_output, z_t, alpha_t, prediction_type)
    return math.sqrt(alpha_s) * x0 + math.sqrt(max(1.0 - alpha_s - sigma**2, 0.0)) * eps


def guided(out_uncond: torch.Tensor, out_cond: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``u + w (c − u)``; ``guidance`` may be per batch row ``(B,)``."""
    if isinstance(guidance, torch.Tensor) and guidance.ndim == 1:
        guidance = guidance.view(-1, *([1] * (out_cond.ndim - 1))).to(out_cond)
    return out_uncond + guidance * (out_cond - out_uncond)
