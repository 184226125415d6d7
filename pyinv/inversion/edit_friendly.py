"""Edit-friendly DDPM inversion (EF-DDPM, Huberman-Spiegelglas et al., arXiv 2304.06140).

DDPM sampling (η = 1) at step t → s = prev(t):
``x_s = μ̂_t(x_t) + σ_t z_t`` with ``μ̂_t = √ᾱ_s x̂0 + √(1−ᾱ_s−σ_t²) ε̃`` and
``σ_t² = (1−ᾱ_s)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_s)``; ε̃ is the CFG prediction (either
parameterisation, see :mod:`pyinv.schedule`).

Inversion (the paper's Algorithm 1): draw ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε_t`` with ε_t
*independent* for every level (not a diffusion chain); then for t = T … 1 extract
``z_t = (x_{t−1} − μ̂_t(x_t)) / σ_t`` with ε̃ = ε(∅) + cfg_src (ε(c_src) − ε(∅)) and re-set
``x_{t−1} = μ̂_t + σ_t z_t`` so rounding does not accumulate. Sampling the stored
``{x_T, z_T … z_1}`` with the same prompt and guidance reproduces x_0 to float rounding.
The last map z_1 is kept (the reference zeroes it). A step with σ_t = 0 (the final step of
the ``"reference"`` spacing, whose last level equals the final level) is deterministic: its
z is 0 and sampling ends at the re-set latent of that level instead of x_0 exactly.

Stored tensors: ``xts (N+1, C, h, w)`` (index k = the level of ``timesteps[N−k]``, index 0
the clean latent) and ``noise_maps (N, C, h, w)`` (row i = sampling step i); the inversion's
guidance is cfg_src (default 3.5). Editing (default guidance cfg_tar = 15) samples the
target prompts from ``xts[N − skip]`` with the stored z's from step ``skip`` on (default 36 of
100 steps, scaled to N for other step counts); the source branch runs c_src at cfg_src and
reproduces x_0. Edit options, applied to the target branches only: ``shift`` (image shifting,
paper Sec. 4: every noise map and the start latent are translated by ``(dy, dx)`` latent
pixels with ``torch.roll``, i.e. circularly, so the maps keep their statistics) and ``color`` (colour manipulation:
``z_t ← z_t + s · B ⊙ (M − x̂0_t)``, mask B, colour target M in latent space, strength s).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..argtypes import non_negative_int
from ..errors import PyinvError
from ..loop import EditProgram
from ..schedule import Schedule, ddpm_mean, guided
from ..seeding import normal
from .base import Method, embed
from .options import MethodOptions, option


@dataclass(frozen=True)
class ColorEdit:
    """EF-DDPM colour manipulation ``z_t ← z_t + strength · mask ⊙ (target − x̂0_t)``.

    Attributes:
        mask: the region B, ``(h, w)`` or ``(1, 1, h, w)``, values in [0, 1] (bool allowed).
        target: the colour image M in the model's latent space, ``(C, h, w)`` or ``(1, C, h, w)``.
        strength: s ≥ 0.
    """

    mask: torch.Tensor
    target: torch.Tensor
    strength: float = 1.0


def sample_levels(z0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """``(N+1, C, h, w)``: index 0 is ``z0``, index k ``√ᾱ z0 + √(1−ᾱ) ε_k`` at the level of
    ``timesteps[N−k]`` with independent ``ε_k ~ N(0, I)`` (drawn on the CPU: seeds reproduce
    across devices)."""
    n = schedule.num_steps
    noise = normal((n, *z0.shape[1:])).to(z0.device, z0.dtype)
    rows = [z0]
    for k in range(1, n + 1):
        a = schedule.alpha(schedule.timesteps[n - k])
        rows.append(math.sqrt(a) * z0 + math.sqrt(1.0 - a) * noise[k - 1 : k])
    return torch.cat(rows)


@torch.no_grad()
def extract_noise(
    model, xts: torch.Tensor, emb: torch.Tensor, schedule: Schedule, guidance: float, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's loop: ``(xts (N+1, C, h, w) re-set, noise_maps (N, C, h, w))``.

    ``emb`` is ``(2, L, D)``: [∅, c_src]; one UNet call (batch 2) per step.
    """
    n = schedule.num_steps
    xts = xts.clone()
    maps = torch.zeros((n, *xts.shape[1:]), device=xts.device, dtype=model.latent_dtype)
    for i in tqdm(range(n), desc="EF-DDPM inversion", disable=not progress, leave=False):
        t, a_t, a_s = schedule.step_alphas(i)
        x_t = xts[n - i : n - i + 1]
        out_u, out_c = model.unet_forward(torch.cat([x_t, x_t]), t, emb).chunk(2)
        sigma = schedule.ddpm_sigma(i)
        mu = ddpm_mean(guided(out_u, out_c, guidance), x_t, a_t, a_s, sigma, schedule.prediction_type)
        if sigma > 0.0:
            maps[i] = ((xts[n - i - 1 : n - i] - mu) / sigma)[0]
        xts[n - i - 1] = (mu + sigma * maps[i : i + 1])[0]
    return xts, maps


def check_shift(shift: Any) -> tuple[int, int]:
    """``(dy, dx)`` from an int (horizontal shift ``dx``) or a pair of ints."""
    if isinstance(shift, numbers.Integral) and not isinstance(shift, bool):
        pair: tuple[Any, ...] = (0, int(shift))
    elif isinstance(shift, Sequence) and not isinstance(shift, str) and len(shift) == 2:
        pair = tuple(shift)
    else:
        raise PyinvError(f"shift must be an int (horizontal) or a pair (dy, dx) of ints, got {shift!r}")
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
        raise PyinvError(f"shift must hold whole latent pixels, got {shift!r}")
    return int(pair[0]), int(pair[1])


def parse_shift(shift: Any, h: int, w: int) -> tuple[int, int]:
    """:func:`check_shift`, and ``|dy| < h``, ``|dx| < w`` for ``h × w`` latents."""
    dy, dx = check_shift(shift)
    if abs(dy) >= h or abs(dx) >= w:
        raise PyinvError(f"shift {(dy, dx)} is too large for {h}x{w} latents (it counts latent pixels)")
    return dy, dx


def as_color_edit(color: Any) -> ColorEdit:
    """``color`` as a :class:`ColorEdit`: one, or a dict with keys ``mask``, ``target`` and
    (optionally) ``strength``; its tensors are checked against the latents by :func:`parse_color`."""
    if isinstance(color, Mapping):
        unknown = set(color) - {"mask", "target", "strength"}
        missing = {"mask", "target"} - set(color)
        if unknown or missing:
            raise PyinvError(
                "color takes keys mask, target and strength"
                + (f"; unknown: {', '.join(sorted(map(str, unknown)))}" if unknown else "")
                + (f"; missing: {', '.join(sorted(missing))}" if missing else "")
            )
        color = ColorEdit(color["mask"], color["target"], color.get("strength", 1.0))
    if not isinstance(color, ColorEdit):
        raise PyinvError(f"color must be a dict with mask/target/strength or a ColorEdit, got {type(color).__name__}")
    return color


def parse_color(color: Any, z0: torch.Tensor) -> ColorEdit:
    """A validated :class:`ColorEdit` for latents like ``z0 (1, C, h, w)`` (mask
    ``(1, 1, h, w)``, target ``(1, C, h, w)``, fp32)."""
    color = as_color_edit(color)
    _, c, h, w = z0.shape
    mask, target, s = color.mask, color.target, color.strength
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in ((h, w), (1, 1, h, w)):
        raise PyinvError(
            f"color mask must be a tensor of shape ({h}, {w}) or (1, 1, {h}, {w}), got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    if not isinstance(target, torch.Tensor) or tuple(target.shape) not in ((c, h, w), (1, c, h, w)):
        raise PyinvError(
            f"color target must be a latent tensor of shape ({c}, {h}, {w}) or (1, {c}, {h}, {w}), got "
            f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}"
        )
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)) or s < 0:
        raise PyinvError(f"color strength must be a non-negative number, got {s!r}")
    mask, target = mask.float().reshape(1, 1, h, w), target.float().reshape(1, c, h, w)
    if not (torch.isfinite(mask).all() and torch.isfinite(target).all()):
        raise PyinvError("color mask and target must be finite")
    if mask.min() < 0 or mask.max() > 1:
        raise PyinvError("color mask values must lie in [0, 1]")
    return ColorEdit(mask, target, float(s))


#: diffusers' LEDITS++ SDXL pipeline: ``invert(num_inversion_steps=50, skip=0.15)`` sets
#: ``int(50 · 1.15) = 57`` timesteps (``"leading"`` spacing) and inverts the last 50, i.e. it
#: skips 7 of 57 (0.15 / 1.15 of the schedule); its source guidance is 3.5, as EF-DDPM's
LEDITS_SDXL_SKIP = 0.15
LEDITS_SDXL_STEPS = int(50 * (1 + LEDITS_SDXL_SKIP))


def default_skip(num_steps: int, family: str = "SD") -> int:
    """T_skip scaled to the step count: the reference's 36 of 100 steps (18 of 50); on SDXL
    LEDITS++'s ``skip=0.15`` of the inverted steps, ``round(N · 0.15 / 1.15)`` (7 of 57)."""
    if family == "SDXL":
        return round(num_steps * LEDITS_SDXL_SKIP / (1 + LEDITS_SDXL_SKIP))
    return round(0.36 * num_steps)


@dataclass(frozen=True)
class EditFriendlyEditOptions(MethodOptions):
    """EF-DDPM's edit options. ``skip`` (default: :func:`default_skip` of the inversion's
    steps) is checked against the step count at the edit; ``shift`` and ``color`` here as far
    as the values alone tell, and against the latents' shape at the edit."""

    skip: int | None = option(
        None,
        "sampling steps to skip at the start",
        flag="--skip",
        parse=non_negative_int,
        metavar="K",
        default_text="36 of 100 steps, scaled to the step count; on SDXL 7 of 57",
    )
    shift: int | tuple[int, int] = option(0, "image shift dx, or (dy, dx), in latent pixels (circular)")
    color: ColorEdit | Mapping[str, Any] | None = option(
        None, "colour manipulation: a ColorEdit, or a dict of mask, target and strength"
    )

    def __post_init__(self):
        check_shift(self.shift)
        if self.color is not None:
            object.__setattr__(self, "color", as_color_edit(self.color))


class EditFriendlyInversion(Method):
    name = "edit-friendly"
    summary = "edit-friendly DDPM inversion: independent noisy levels, extracted noise maps, DDPM sampling"
    default_steps = 100
    default_guidance = 15.0  # cfg_tar, the edit's guidance
    default_inversion_guidance = 3.5  # cfg_src
    default_schedule = "checkpoint"
    needs_source_prompt = False
    edit_options_type = EditFriendlyEditOptions
    tensors = ("xts", "noise_maps")
    #: DDPM_inversion's P2P runs (main_run.py --mode p2pinv): windows 0.6 / 0.2 (its README:
    #: "(0.6, 0.2) and (0.8, 0.4) for p2pinv and p2p respectively"), self-attention replaced in
    #: layers of at most 16² queries (its ptp_classes.replace_self_attention)
    control_defaults = {"p2p": {"cross_replace": 0.6, "self_replace": 0.2, "self_max_tokens": 16 * 16}}
    #: SDXL: diffusers' LEDITS++ SDXL pipeline's schedule (57 leading-spaced steps, 7 skipped;
    #: :data:`LEDITS_SDXL_STEPS`) and source guidance (3.5, as here); the edit's guidance is
    #: 5, the SDXL pipelines' default guidance and LEDITS++'s default edit guidance
    family_defaults = {"SDXL": {"steps": LEDITS_SDXL_STEPS, "guidance": 5.0}}

    def _invert(self, model, z0, source_prompt, schedule, guidance, options, progress):
        """Sample independent levels, extract ``noise_maps`` at cfg_src = ``guidance`` (N UNet calls):
        ``xts (N+1, C, h, w)`` re-set and ``noise_maps (N, C, h, w)``."""
        z0 = z0.to(model.device, model.latent_dtype)
        emb = torch.cat([embed(model, [""]), embed(model, [source_prompt])])
        xts, maps = extract_noise(model, sample_levels(z0, schedule), emb, schedule, float(guidance), progress)
        return {"xts": xts, "noise_maps": maps}, {}

    def program(self, model, inv, schedule, targets, guidance, with_source, options) -> EditProgram:
        """Targets at ``guidance`` from ``xts[N − skip]``, step ``skip`` on, with the stored z's."""
        n = schedule.num_steps
        skip = default_skip(n, model.family) if options.skip is None else options.skip
        if isinstance(skip, bool) or not isinstance(skip, numbers.Integral) or not 0 <= skip < n:
            raise PyinvError(
                f"skip must be an integer in [0, {n}) for this {n}-step inversion, got {skip!r}"
                " (the reference skips 36 of 100 steps)"
            )
        skip = int(skip)
        xts, maps = inv["xts"].to(model.device), inv["noise_maps"].to(model.device)
        dy, dx = parse_shift(options.shift, *xts.shape[-2:])
        paint = parse_color(options.color, inv.z0) if options.color is not None else None
        prompts = ([inv.source_prompt] if with_source else []) + list(targets)
        B, first = len(prompts), int(with_source)
        start = xts[n - skip : n - skip + 1].expand(B, -1, -1, -1).clone()
        noise: Callable[[int], torch.Tensor] = lambda i: maps[i]
        if (dy, dx) != (0, 0):
            start[first:] = torch.roll(start[first:], shifts=(dy, dx), dims=(-2, -1))
            shifted = torch.roll(maps, shifts=(dy, dx), dims=(-2, -1))
            if with_source:  # the source keeps the unshifted maps (it reconstructs x_0)
                noise = lambda i: torch.cat([maps[i : i + 1], shifted[i : i + 1].expand(B - 1, -1, -1, -1)])
            else:
                noise = lambda i: shifted[i]
        guide = torch.full((B,), float(guidance))
        if with_source:
            guide[0] = inv.guidance  # the source reproduces x_0 at the guidance it was inverted with
        adjust = None
        if paint is not None:
            mask, target = paint.mask.to(model.device), paint.target.to(model.device)

            def adjust(i: int, x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
                z = z.clone()
                z[first:] += paint.strength * mask * (target - x0[first:])
                return z

        return EditProgram(
            schedule=schedule,
            start=start,
            uncond=embed(model, [""]).expand(B, -1, -1),
            cond=embed(model, prompts),
            guidance=guide,
            has_source=with_source,
            first_step=skip,
            sigmas=[schedule.ddpm_sigma(i) for i in range(n)],
            noise=noise,
            noise_adjust=adjust,
        )
