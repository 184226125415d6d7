"""The one denoising driver every method's editing (and reconstruction) runs through.

A method describes its edit as an :class:`EditProgram`: the branches (optional source
first, then one per target prompt), their start latents, per-step embeddings and
guidance, and the per-step corrections (Direct Inversion's pin or offsets, EF-DDPM's
noise maps). The driver decides the UNet batch from what the program and the controller
need (:class:`BatchLayout`), has the controller plan the edit's control for that layout
(:meth:`~pyinv.control.base.Controller.plan`), calls the UNet once per step with the step's
control, and applies CFG + step + correction (+ LocalBlend's mask) with the fused step op
(:func:`pyinv.ops.guided_step`). The edit's state (latents, LocalBlend's map sum, counts)
lives in :func:`run` alone.

Batch rows per step: for each branch, an unconditional pass when its guidance ≠ 1
(and it is stepped), and a conditional pass; a *pinned* source branch is not stepped
(its latent is set to ``z*_{prev(t)}``), so it has only the passes the controller reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import ops
from .control.base import Controller, EditContext, NoControl
from .schedule import Schedule, guided, split_prediction

#: A per-step tensor: the same for every step, or a function of the step index.
PerStep = torch.Tensor | Callable[[int], torch.Tensor]


def _at(value: PerStep, i: int) -> torch.Tensor:
    return value(i) if callable(value) else value


@dataclass
class EditProgram:
    """What a method hands the driver. ``B`` branches; shapes in brackets.

    Attributes:
        schedule: the noise schedule; steps ``first_step … N−1`` are run.
        start: start latents ``(B, C, h, w)`` at level ``timesteps[first_step]``.
        uncond: unconditional embeddings ``(B, L, D)`` (or per step).
        cond: conditional embeddings ``(B, L, D)`` (or per step).
        guidance: CFG scale per branch ``(B,)``.
        has_source: branch 0 is the source branch.
        source_pin: the pivot trajectory ``(N+1, C, h, w)`` (index k = level k steps up);
            when given, after step i the source is set to ``trajectory[N−1−i]`` (it is not
            stepped, so its UNet passes run only when the controller reads them).
        source_offsets: with ``source_pin``, Direct Inversion's reference form instead: the
            source runs all its passes and is stepped like the other branches, and step i
            adds ``o_i = trajectory[N−1−i] − step(z_src)``, with ``step(z_src)`` the same step
            op on the source's own outputs of this UNet call. ``o_i`` is the reference's offset
            evaluated in the batch it is applied in, so it cancels that batch's rounding and
            the source stays on the pivot to within one rounding per step (DDIM programs).
        sigmas: per-step σ for DDPM sampling (``None`` = DDIM).
        noise: per-step noise maps ``(C, h, w)`` or ``(B, C, h, w)`` (with ``sigmas``).
        noise_adjust: optional ``f(i, x0_pred (B,C,h,w), noise) -> noise`` (EF-DDPM
            colour manipulation needs x̂0 before the step; uses the unfused path).
        source_drifts: the source branch is plain guided sampling with no correction
            (DDIM), so a controller may choose its guidance (PnP uses the guidance-1
            reconstruction, as its reference does).
    """

    schedule: Schedule
    start: torch.Tensor
    uncond: PerStep
    cond: PerStep
    guidance: torch.Tensor
    has_source: bool = False
    first_step: int = 0
    source_pin: torch.Tensor | None = None
    source_offsets: bool = False
    sigmas: list[float] | None = None
    noise: PerStep | None = None
    noise_adjust: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    source_drifts: bool = False

    @property
    def num_branches(self) -> int:
        return int(self.start.shape[0])

    @property
    def source_pinned(self) -> bool:
        """The source is set to the pivot after every step instead of being stepped."""
        return self.has_source and self.source_pin is not None and not self.source_offsets


@dataclass(frozen=True)
class BatchLayout:
    """Which branch and which pass each row of the UNet batch is (:func:`plan_layout`).

    ``rows[r] = (branch, kind)`` with kind ``"uncond"`` or ``"cond"``; branch 0 is the
    source when ``has_source``. Unconditional rows come first, as in diffusers.
    """

    rows: tuple[tuple[int, str], ...]
    num_branches: int
    has_source: bool

    def row_of(self, branch: int, kind: str) -> int | None:
        for r, row in enumerate(self.rows):
            if row == (branch, kind):
                return r
        return None

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass
class LoopResult:
    """Final latents ``(B, C, h, w)`` (fp32) and what the loop spent."""

    latents: torch.Tensor
    unet_calls: int
    unet_image_forwards: int
    layout: BatchLayout
    trajectory: list[torch.Tensor] = field(default_factory=list)


def plan_layout(program: EditProgram, controller: Controller) -> BatchLayout:
    """The UNet batch rows: unconditional passes first, then conditional ones."""
    uncond_rows, cond_rows = [], []
    pinned = program.source_pinned
    for b in range(program.num_branches):
        is_source = program.has_source and b == 0
        if is_source and pinned:
            if "uncond" in controller.reads_source:
                uncond_rows.append((b, "uncond"))
            if "cond" in controller.reads_source:
                cond_rows.append((b, "cond"))
            continue
        if float(program.guidance[b]) != 1.0 or (is_source and "uncond" in controller.reads_source):
            uncond_rows.append((b, "uncond"))
        cond_rows.append((b, "cond"))
    return BatchLayout(
        rows=tuple(uncond_rows + cond_rows), num_branches=program.num_branches, has_source=program.has_source
    )


def run(
    model,
    program: EditProgram,
    controller: Controller | None = None,
    context: EditContext | None = None,
    progress: bool = False,
    desc: str = "edit",
    keep_trajectory: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> LoopResult:
    """Sample ``program`` to level 0 under ``controller``'s plan; see the module docstring.

    The controller plans the edit's control once (``controller.plan``, for ``context``: the
    prompts and the method's reference values); each step's UNet call gets the plan's step
    control and returns, besides the model output, the word maps LocalBlend sums. Nothing is
    kept outside this call: the model is not changed and the controller is only read.
    ``on_step(i, latents)`` is told the latents after each step.
    """
    controller = controller or NoControl()
    context = context or EditContext("", ())
    schedule = program.schedule
    layout = plan_layout(program, controller)
    plan = controller.plan(model, program, layout, context)
    B = program.num_branches
    n = schedule.num_steps
    device = model.device
    latents = program.start.to(device=device, dtype=model.latent_dtype).clone()
    guidance = program.guidance.to(device=device, dtype=model.latent_dtype)
    v_pred = schedule.prediction_type == "v_prediction"

    row_branch = torch.tensor([b for b, _ in layout.rows], device=device, dtype=torch.long)
    cond_index, uncond_index = _gather_indices(layout, B, device)
    pin_mask = None
    if program.source_pinned:
        pin_mask = torch.zeros(B, dtype=torch.bool, device=device)
        pin_mask[0] = True
    maps = None
    if plan.maps_shape is not None:  # LocalBlend's running sum, a tensor from the start (0 + maps = maps)
        maps = torch.zeros(plan.maps_shape, device=device, dtype=torch.float32)
    calls = forwards = 0
    trajectory = [latents.clone()] if keep_trajectory else []
    # the timesteps on the device once: a per-step host-to-device copy would wait for the device
    timesteps = torch.tensor([int(t) for t in schedule.timesteps], dtype=torch.int64, device=device)
    alphas = {i: schedule.step_alphas(i) for i in range(program.first_step, n)}  # host numbers, once

    for i in tqdm(range(program.first_step, n), desc=desc, disable=not progress, leave=False):
        t, a_t, a_s = alphas[i]
        uncond, cond = _at(program.uncond, i).to(device), _at(program.cond, i).to(device)
        if layout.size:
            emb = torch.stack([(uncond if k == "uncond" else cond)[b] for (b, k) in layout.rows])
            with torch.no_grad():
                out, gathered = model.unet_forward_controlled(
                    latents.index_select(0, row_branch), timesteps[i], emb, plan.step(i)
                )
            calls, forwards = calls + 1, forwards + layout.size
            if gathered is not None:
                maps = maps + gathered
            out_c, out_u = out.index_select(0, cond_index), out.index_select(0, uncond_index)
        else:  # only a pinned source without passes: nothing to run
            out_c = out_u = torch.zeros_like(latents)
        blend = plan.blend_mask(i, maps)
        noise = sigma = None
        if program.sigmas is not None:
            sigma = program.sigmas[i]
            noise = _at(program.noise, i).to(device=device, dtype=model.latent_dtype)
            if noise.ndim == latents.ndim - 1:
                noise = noise.unsqueeze(0).expand_as(latents)
            if program.noise_adjust is not None:
                x0 = _x0(out_u, out_c, guidance, latents, a_t, v_pred)
                noise = program.noise_adjust(i, x0, noise)
        offset = pin = None
        if program.has_source and program.source_pin is not None:
            target = program.source_pin[n - 1 - i].to(device=device, dtype=model.latent_dtype)
            if program.source_offsets:  # o_i from this call's own source outputs (EditProgram)
                stepped = ops.guided_step(latents[:1], out_u[:1], out_c[:1], guidance[:1], a_t, a_s, v_pred)
                offset = torch.zeros_like(latents)
                offset[0] = target - stepped[0]
            else:
                pin = target.unsqueeze(0).expand_as(latents)
        latents = ops.guided_step(
            latents,
            out_u,
            out_c,
            guidance,
            a_t,
            a_s,
            v_pred,
            sigma=sigma or 0.0,
            noise=noise,
            offset=offset,
            pin=pin,
            pin_mask=pin_mask,
            blend_mask=blend,
        )
        latents = plan.after_step(i, latents)
        if on_step is not None:
            on_step(i, latents)
        if keep_trajectory:
            trajectory.append(latents.clone())
    return LoopResult(
        latents=latents, unet_calls=calls, unet_image_forwards=forwards, layout=layout, trajectory=trajectory
    )


def _gather_indices(layout: BatchLayout, B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per branch: the batch row of its conditional and unconditional output. A branch
    without an unconditional pass uses its conditional row for both (CFG is then the
    conditional output); a branch with no pass at all (pinned source) points at row 0."""
    cond_idx, uncond_idx = [], []
    for b in range(B):
        c = layout.row_of(b, "cond")
        u = layout.row_of(b, "uncond")
        c = c if c is not None else (u if u is not None else 0)
        cond_idx.append(c)
        uncond_idx.append(u if u is not None else c)
    return (
        torch.tensor(cond_idx, device=device, dtype=torch.long),
        torch.tensor(uncond_idx, device=device, dtype=torch.long),
    )


def _x0(out_u, out_c, guidance, latents, a_t, v_pred) -> torch.Tensor:
    """x̂0 of the guided prediction (for program hooks that need it before the step)."""
    m = guided(out_u, out_c, guidance)
    return split_prediction(m, latents, a_t, "v_prediction" if v_pred else "epsilon")[0]
