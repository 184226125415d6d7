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


@dataclass
class EditJob:
    """One edit for :func:`run_shared`: its program, controller and plan context."""

    program: EditProgram
    controller: Controller | None = None
    context: EditContext | None = None


@dataclass
class StepCall:
    """What one edit puts into a step's UNet call: ``sample (R, C, h, w)`` and
    ``embeddings (R, L, D)`` (R = the edit's layout size) and the step's control."""

    sample: torch.Tensor
    embeddings: torch.Tensor
    control: object  # StepControl | None


class EditRun:
    """One edit being sampled, step by step: :meth:`call` gives step ``i``'s UNet inputs,
    :meth:`advance` takes that call's outputs and applies CFG + step + correction (+ blend).

    :func:`run` drives one; :func:`run_shared` drives several in lockstep and gives each step
    of theirs one UNet call when their controls can share it. All the edit's state lives here.
    """

    def __init__(self, model, program: EditProgram, controller=None, context=None, keep_trajectory=False, on_step=None):
        controller = controller or NoControl()
        context = context or EditContext("", ())
        self.model, self.program, self.on_step = model, program, on_step
        self.schedule = schedule = program.schedule
        self.layout = layout = plan_layout(program, controller)
        self.plan = controller.plan(model, program, layout, context)
        device = model.device
        self.latents = program.start.to(device=device, dtype=model.latent_dtype).clone()
        self.guidance = program.guidance.to(device=device, dtype=model.latent_dtype)
        self.v_pred = schedule.prediction_type == "v_prediction"
        self.row_branch = torch.tensor([b for b, _ in layout.rows], device=device, dtype=torch.long)
        self.cond_index, self.uncond_index = _gather_indices(layout, program.num_branches, device)
        self.pin_mask = None
        if program.source_pinned:
            self.pin_mask = torch.zeros(program.num_branches, dtype=torch.bool, device=device)
            self.pin_mask[0] = True
        self.maps = None
        if self.plan.maps_shape is not None:  # LocalBlend's running sum, a tensor from the start
            self.maps = torch.zeros(self.plan.maps_shape, device=device, dtype=torch.float32)
        self.calls = self.forwards = 0
        self.keep_trajectory = keep_trajectory
        self.trajectory = [self.latents.clone()] if keep_trajectory else []
        # the timesteps on the device once: a per-step host-to-device copy would wait for the device
        self.timesteps = torch.tensor([int(t) for t in schedule.timesteps], dtype=torch.int64, device=device)
        n = schedule.num_steps
        self.alphas = {i: schedule.step_alphas(i) for i in range(program.first_step, n)}  # host numbers, once

    @property
    def steps(self) -> range:
        return range(self.program.first_step, self.schedule.num_steps)

    def call(self, i: int) -> StepCall | None:
        """Step ``i``'s UNet inputs, ``None`` when the step needs no call (a pinned source alone)."""
        if not self.layout.size:
            return None
        device = self.model.device
        uncond, cond = _at(self.program.uncond, i).to(device), _at(self.program.cond, i).to(device)
        emb = torch.stack([(uncond if k == "uncond" else cond)[b] for (b, k) in self.layout.rows])
        return StepCall(self.latents.index_select(0, self.row_branch), emb, self.plan.step(i))

    def advance(self, i: int, out: torch.Tensor | None, gathered: torch.Tensor | None) -> None:
        """Finish step ``i`` with its call's output ``(R, C, h, w)`` and word maps."""
        program, model, latents = self.program, self.model, self.latents
        device = model.device
        n = self.schedule.num_steps
        t, a_t, a_s = self.alphas[i]
        if out is not None:
            self.calls, self.forwards = self.calls + 1, self.forwards + self.layout.size
            if gathered is not None:
                self.maps = self.maps + gathered
            out_c, out_u = out.index_select(0, self.cond_index), out.index_select(0, self.uncond_index)
        else:  # only a pinned source without passes: nothing to run
            out_c = out_u = torch.zeros_like(latents)
        guidance, v_pred = self.guidance, self.v_pred
        blend = self.plan.blend_mask(i, self.maps)
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
            pin_mask=self.pin_mask,
            blend_mask=blend,
        )
        self.latents = latents = self.plan.after_step(i, latents)
        if self.on_step is not None:
            self.on_step(i, latents)
        if self.keep_trajectory:
            self.trajectory.append(latents.clone())

    def result(self) -> LoopResult:
        return LoopResult(
            latents=self.latents,
            unet_calls=self.calls,
            unet_image_forwards=self.forwards,
            layout=self.layout,
            trajectory=self.trajectory,
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
    edit = EditRun(model, program, controller, context, keep_trajectory, on_step)
    for i in tqdm(edit.steps, desc=desc, disable=not progress, leave=False):
        call = edit.call(i)
        out = gathered = None
        if call is not None:
            with torch.no_grad():
                t = edit.timesteps[i]
                out, gathered = model.unet_forward_controlled(call.sample, t, call.embeddings, call.control)
        edit.advance(i, out, gathered)
    return edit.result()


def run_shared(model, jobs: list[EditJob], progress: bool = False, desc: str = "edits") -> list[LoopResult]:
    """Several edits at once: each is sampled as :func:`run` samples it, but the edits that
    run the same timesteps go in lockstep, and at each step the calls of those whose controls
    can share one UNet call (:func:`pyinv.control.shared.share_key`: no control, or the same
    rule and active terms up to row numbers) are one call of their batches concatenated, with
    the controls merged row by row (:func:`pyinv.control.shared.merge`). Each edit's step op,
    corrections and LocalBlend mask stay its own. Returns one :class:`LoopResult` per job, in
    order; ``unet_calls`` counts, per edit, the calls its rows were in.

    The results equal separate runs up to the rounding that depends on what else is in a
    batch (≤ 1e-12 in float64 on the CPU, tested for every loop method and controller)."""
    from .control.shared import merge, share_key

    edits = [EditRun(model, job.program, job.controller, job.context) for job in jobs]
    lockstep: dict[tuple, list[int]] = {}
    for k, edit in enumerate(edits):
        key = (tuple(int(t) for t in edit.schedule.timesteps), edit.program.first_step)
        lockstep.setdefault(key, []).append(k)
    total = sum(len(edits[g[0]].steps) for g in lockstep.values())
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for members in lockstep.values():
            for i in edits[members[0]].steps:
                calls = {k: edits[k].call(i) for k in members}
                groups: dict[object, list[int]] = {}
                for k in members:
                    if calls[k] is not None:
                        key = share_key(calls[k].control)
                        groups.setdefault(key if key is not None else ("alone", k), []).append(k)
                outputs: dict[int, tuple] = {k: (None, None) for k in members}
                for group in groups.values():
                    parts = [calls[k] for k in group]
                    sizes = [p.sample.shape[0] for p in parts]
                    control, split_maps = merge([p.control for p in parts], sizes)
                    with torch.no_grad():
                        out, gathered = model.unet_forward_controlled(
                            torch.cat([p.sample for p in parts]),
                            edits[group[0]].timesteps[i],
                            torch.cat([p.embeddings for p in parts]),
                            control,
                        )
                    pieces = out.split(sizes)
                    maps = split_maps(gathered) if gathered is not None else [None] * len(group)
                    for k, piece, m in zip(group, pieces, maps, strict=True):
                        outputs[k] = (piece, m)
                for k in members:
                    edits[k].advance(i, *outputs[k])
                bar.update(1)
    return [edit.result() for edit in edits]


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
