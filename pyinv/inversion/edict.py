"""EDICT: Exact Diffusion Inversion via Coupled Transformations (arXiv 2211.12446).

Two coupled latent sequences ``x, y`` (both ``z0`` at the clean level) are moved
together so that every step is an affine coupling layer, hence exactly invertible.
For the move t → s = prev(t), with ``a = √(ᾱ_s/ᾱ_t)`` and ``b = √(1−ᾱ_s) − a √(1−ᾱ_t)``
(the ε-form of the deterministic DDIM step ``z_s = a z_t + b ε``), a denoising step is

    x_inter = a x + b ε̃(y, t);   y_inter = a y + b ε̃(x_inter, t)
    x'      = p x_inter + (1−p) y_inter;   y' = p y_inter + (1−p) x'

with mixing ``p`` (default 0.93) and ``ε̃`` the CFG prediction ``ε(∅) + w (ε(c) − ε(∅))``
(v-prediction outputs are turned into ε at level ᾱ_t on the UNet's own input). With
*leapfrog* (default) every other step swaps the roles: ``y`` moves first, using ``ε̃(x)``
(odd steps counted from the first step run; each inversion step mirrors the order of the
denoising step it undoes, so any number of steps inverts exactly).
The inversion step is the algebraic inverse: undo the mixes in reverse order
(``y = (y' − (1−p) x')/p``, then ``x = (x' − (1−p) y)/p``), then the affine updates in
reverse order (``y = (y_inter − b ε̃(x_inter))/a``, then ``x = (x_inter − b ε̃(y))/a``).
The UNet sees the same inputs in both directions, so sampling the inverted pair back
with the source prompt and the same guidance returns ``z0`` up to float rounding
(relative error ≈1e-6–1e-5 in float32, ≈1e-15 with a float64 model, a few 1e-4 with a
fp16/bf16 UNet, which rounds its inputs; the reference runs in float64).

``strength`` s (default 0.8) runs only the last ``⌊N·s⌋`` steps of the N-step schedule:
the image is inverted to level ``timesteps[N − ⌊N·s⌋]`` and edited from there (the
reference's img2img-style editing). Defaults follow the reference code: 50 steps,
guidance 3, mixing 0.93, leapfrog on; the edit's output is the ``x`` sequence.

EDICT couples the two sequences (``ε̃(y)`` is needed before ``x`` can move), so it runs
its own loop instead of :func:`pyinv.loop.run`: two UNet calls per step, each batching
every branch's unconditional and conditional rows. Attention control is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..control.base import Controller, NoControl
from ..errors import PyinvError
from ..schedule import Schedule, guided, split_prediction
from .base import EditOutput, Method, counters, embed
from .options import MethodOptions, option

Rows = tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class EDICTOptions(MethodOptions):
    """EDICT's inversion options (recorded; the edit runs with the same ones)."""

    mixing: float = option(0.93, "mixing p of the two coupled sequences, in (0, 1)")
    leapfrog: bool = option(True, "alternate which sequence moves first")
    strength: float = option(0.8, "fraction s of the steps run (from timesteps[N − ⌊N·s⌋]), in (0, 1]")

    def __post_init__(self):
        mixing, leapfrog, strength = self.mixing, self.leapfrog, self.strength
        if isinstance(mixing, bool) or not isinstance(mixing, (int, float)) or not 0.0 < float(mixing) < 1.0:
            raise PyinvError(f"EDICT mixing must be a number in (0, 1), got {mixing!r}")
        if not isinstance(leapfrog, bool):
            raise PyinvError(f"EDICT leapfrog must be True or False, got {leapfrog!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
            raise PyinvError(f"EDICT strength must be a number in (0, 1], got {strength!r}")
        object.__setattr__(self, "mixing", float(mixing))
        object.__setattr__(self, "strength", float(strength))


def first_step(num_steps: int, strength: float) -> int:
    """Index of the first sampling step run: ``N − ⌊N·s⌋`` (the reference's ``t_limit``)."""
    run = int(num_steps * strength)
    if run < 1:
        raise PyinvError(f"EDICT strength {strength} leaves no step to run with {num_steps} steps")
    return num_steps - run


def batch_rows(guidance: Sequence[float]) -> Rows:
    """UNet rows of one half-step: unconditional rows (branches with w ≠ 1) first, then conditional."""
    uncond = [(b, "uncond") for b, w in enumerate(guidance) if w != 1.0]
    return tuple(uncond + [(b, "cond") for b in range(len(guidance))])


class Coupled:
    """The EDICT step pair for one schedule, batched over ``B`` branches.

    Args:
        model: the :class:`~pyinv.models.DiffusionModel`.
        schedule: the N-step schedule.
        mixing: ``p``; leapfrog: alternate which sequence moves first; start: first step run.
        uncond / cond: embeddings ``(B, L, D)``; guidance: CFG scale per branch.
    """

    def __init__(
        self,
        model,
        schedule: Schedule,
        mixing: float,
        leapfrog: bool,
        start: int,
        uncond: torch.Tensor,
        cond: torch.Tensor,
        guidance: Sequence[float],
    ):
        self.model, self.schedule, self.p, self.leapfrog, self.start = model, schedule, mixing, leapfrog, start
        self.rows = batch_rows(guidance)
        dev = model.device
        self.emb = torch.stack([(uncond if k == "uncond" else cond)[b] for b, k in self.rows]).to(dev)
        self.branch = torch.tensor([b for b, _ in self.rows], device=dev, dtype=torch.long)
        cond_row = {b: r for r, (b, k) in enumerate(self.rows) if k == "cond"}
        uncond_row = {b: r for r, (b, k) in enumerate(self.rows) if k == "uncond"}
        B = len(guidance)
        self.cond_index = torch.tensor([cond_row[b] for b in range(B)], device=dev, dtype=torch.long)
        self.uncond_index = torch.tensor(
            [uncond_row.get(b, cond_row[b]) for b in range(B)], device=dev, dtype=torch.long
        )
        self.guidance = torch.tensor([float(w) for w in guidance], device=dev, dtype=model.latent_dtype)

    def coefficients(self, i: int) -> tuple[int, float, float, float]:
        """``(t, ᾱ_t, a, b)`` of sampling step ``i``: ``a = √(ᾱ_s/ᾱ_t)``, ``b = √(1−ᾱ_s) − a√(1−ᾱ_t)``."""
        t, a_t, a_s = self.schedule.step_alphas(i)
        a = math.sqrt(a_s / a_t)
        return t, a_t, a, math.sqrt(1.0 - a_s) - a * math.sqrt(1.0 - a_t)

    def y_first(self, i: int) -> bool:
        """Whether ``y`` moves first at step ``i`` (leapfrog: odd steps counted from ``start``)."""
        return self.leapfrog and (i - self.start) % 2 == 1

    def eps(self, z: torch.Tensor, t: int, a_t: float) -> torch.Tensor:
        """``ε̃(z, t)`` for every branch ``(B, C, h, w)``: one UNet call over all rows."""
        with torch.no_grad():
            out = self.model.unet_forward(z.index_select(0, self.branch), t, self.emb)
        m = guided(out.index_select(0, self.uncond_index), out.index_select(0, self.cond_index), self.guidance)
        return split_prediction(m, z, a_t, self.schedule.prediction_type)[1]

    def denoise(self, i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``i`` (t → prev(t)): two affine updates, then the two mixes."""
        t, a_t, a, b = self.coefficients(i)
        pair = [x, y]
        k = 1 if self.y_first(i) else 0
        for moved in (k, 1 - k):
            pair[moved] = a * pair[moved] + b * self.eps(pair[1 - moved], t, a_t)
        x, y = pair
        x = self.p * x + (1.0 - self.p) * y
        y = self.p * y + (1.0 - self.p) * x
        return x, y

    def invert(self, i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact inverse of :meth:`denoise` (prev(t) → t): undo the mixes, then the updates."""
        t, a_t, a, b = self.coefficients(i)
        y = (y - (1.0 - self.p) * x) / self.p
        x = (x - (1.0 - self.p) * y) / self.p
        pair = [x, y]
        k = 1 if self.y_first(i) else 0
        for moved in (1 - k, k):
            pair[moved] = (pair[moved] - b * self.eps(pair[1 - moved], t, a_t)) / a
        return pair[0], pair[1]


def check_controller(controller: Controller | None) -> None:
    """EDICT runs no attention control: only ``None`` or a plain :class:`NoControl` pass."""
    if controller is None:
        return
    if type(controller) is not NoControl or controller.reads_source:
        raise PyinvError("EDICT does not support attention control")


class EDICTInversion(Method):
    """EDICT (arXiv 2211.12446); see the module docstring for the coupled step."""

    name = "edict"
    summary = "EDICT: two coupled latent sequences, exactly invertible affine coupling steps"
    default_steps = 50
    default_guidance = 3.0
    takes_control = False
    shares_calls = False  # its coupled loop is its own
    invert_options_type = EDICTOptions
    tensors = ("edict_x", "edict_y")

    def _invert(self, model, z0, source_prompt, schedule, guidance, options, progress):
        """Invert ``z0 (1, C, h, w)`` with ``c_src`` at guidance w: the pair ``edict_x``,
        ``edict_y (1, C, h, w)`` at level ``timesteps[N − ⌊N·s⌋]``."""
        start = first_step(schedule.num_steps, options.strength)
        step = Coupled(
            model,
            schedule,
            options.mixing,
            options.leapfrog,
            start,
            embed(model, [""]),
            embed(model, [source_prompt]),
            [float(guidance)],
        )
        x = z0.to(model.device, model.latent_dtype)
        y = x.clone()
        for i in tqdm(
            range(schedule.num_steps - 1, start - 1, -1), desc="EDICT inversion", disable=not progress, leave=False
        ):
            x, y = step.invert(i, x, y)
        return {"edict_x": x, "edict_y": y}, {}

    def _edit(self, model, inv, schedule, targets, guidance, controller, with_source, progress, options):
        """Sample the stored pair from its level with each target prompt at ``guidance``.

        Branch 0 is the source when ``with_source``: it runs at the inversion's guidance, so
        it is the exact reconstruction. Output latents are each branch's ``x``.
        """
        check_controller(controller)
        recorded = self.recorded_options(inv)
        start = first_step(schedule.num_steps, recorded.strength)
        prompts = ([inv.source_prompt] if with_source else []) + list(targets)
        B = len(prompts)
        ws = ([float(inv.guidance)] if with_source else []) + [float(guidance)] * len(targets)
        uncond = embed(model, [""]).expand(B, -1, -1)
        step = Coupled(model, schedule, recorded.mixing, recorded.leapfrog, start, uncond, embed(model, prompts), ws)
        x = inv["edict_x"].to(model.device, model.latent_dtype).expand(B, -1, -1, -1).clone()
        y = inv["edict_y"].to(model.device, model.latent_dtype).expand(B, -1, -1, -1).clone()
        calls = counters(model)
        for i in tqdm(range(start, schedule.num_steps), desc="edit (edict)", disable=not progress, leave=False):
            x, y = step.denoise(i, x, y)
        return EditOutput(
            targets=x[1:] if with_source else x,
            source=x[:1] if with_source else None,
            unet_calls=model.unet_calls - calls[0],
            unet_image_forwards=model.unet_image_forwards - calls[1],
            batch_rows=step.rows,
        )
