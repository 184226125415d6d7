"""What every inversion method provides, and the pieces they share.

A method inverts (``invert`` → :class:`Inversion`) and describes its edit as an
:class:`~pyinv.loop.EditProgram` (``program``) that the one loop driver runs. Branch 0 is
the source when the edit needs one; the rest are the target prompts, in order. The base
class owns the options, the schedule, the timing and the record; a method's module holds
its algorithm (``_invert``, ``program``) and its options dataclasses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from .. import loop
from ..control.base import Controller, EditContext
from ..errors import PyinvError
from ..schedule import SCHEDULE_MODES, Schedule, ddim_step, make_schedule
from .options import KINDS, MethodOptions, NoOptions, OptionDefaults
from .record import Inversion


@dataclass
class EditOutput:
    """Latents of an edit: ``targets (T, C, h, w)``, ``source (1, C, h, w)`` or ``None``."""

    targets: torch.Tensor
    source: torch.Tensor | None
    unet_calls: int
    unet_image_forwards: int
    batch_rows: tuple[tuple[int, str], ...]


class Method:
    """Base class of the inversion methods (see ``METHODS.md`` for each algorithm).

    The base class runs what every method shares; a method writes its algorithm:

    - inversion: :meth:`invert` checks the options (``invert_options_type``), builds the
      N-step schedule, times the work of :meth:`_invert` and makes the :class:`Inversion`
      (``z0`` and the method's tensors on the CPU, the options, the UNet counts and seconds);
    - editing: :meth:`edit` checks the options (``edit_options_type``), rebuilds the
      inversion's schedule and runs :meth:`_edit`, by default the one loop driver over the
      :class:`~pyinv.loop.EditProgram` that :meth:`program` describes.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 7.5
    #: the guidance ``invert`` gets when the user gives none (``None``: ``default_guidance``)
    default_inversion_guidance: ClassVar[float | None] = None
    default_schedule: ClassVar[str] = "reference"
    needs_source_prompt: ClassVar[bool] = True
    #: whether edits take an attention controller (EDICT's coupled loop does not)
    takes_control: ClassVar[bool] = True
    #: the options ``invert`` takes (recorded in the inversion) and those ``edit`` takes
    invert_options_type: ClassVar[type[MethodOptions]] = NoOptions
    edit_options_type: ClassVar[type[MethodOptions]] = NoOptions
    #: option name → default of each kind, read from the dataclasses above
    invert_options = OptionDefaults("invert")
    edit_options = OptionDefaults("edit")
    #: controller settings of the reference that pairs a controller with this method, by
    #: controller kind (``{"p2p": {"cross_replace": …, "self_replace": …, "self_max_tokens": …}}``);
    #: used where the user gave none
    control_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: defaults on another model family than SD 1.x/2.x, where a reference for it sets them:
    #: family (``"SDXL"``) → the ones that differ, of ``steps``, ``guidance`` and
    #: ``inversion_guidance`` (read through :meth:`defaults_for`)
    family_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    #: tensors an inversion of this method must hold (besides z0) for editing
    tensors: ClassVar[tuple[str, ...]] = ()

    def required_tensors(self, inv: Inversion) -> tuple[str, ...]:
        return self.tensors

    # ------------------------------------------------------------------ defaults
    @classmethod
    def defaults_for(cls, model: Any = None) -> dict[str, Any]:
        """``{"steps", "guidance", "inversion_guidance"}`` on ``model`` (a model, a family name
        such as ``"SDXL"``, or ``None`` for SD 1.x/2.x): the class defaults, with those of
        :attr:`family_defaults` for the model's family. ``inversion_guidance`` ``None``: the
        inversion uses ``guidance``."""
        family = model if isinstance(model, str) or model is None else getattr(model, "family", "SD")
        found = {
            "steps": cls.default_steps,
            "guidance": cls.default_guidance,
            "inversion_guidance": cls.default_inversion_guidance,
        }
        found.update(cls.family_defaults.get(family or "SD", {}))
        return found

    @classmethod
    def steps_for(cls, model: Any = None) -> int:
        """The default step count on ``model`` (:meth:`defaults_for`)."""
        return int(cls.defaults_for(model)["steps"])

    @classmethod
    def guidance_for(cls, model: Any = None) -> float:
        """The default edit guidance on ``model`` (:meth:`defaults_for`)."""
        return float(cls.defaults_for(model)["guidance"])

    @classmethod
    def inversion_guidance_for(cls, model: Any = None) -> float | None:
        """The default inversion guidance on ``model``, ``None`` when it is the edit's
        (:meth:`defaults_for`)."""
        return cls.defaults_for(model)["inversion_guidance"]

    # ------------------------------------------------------------------ options
    @classmethod
    def options_type(cls, kind: str) -> type[MethodOptions]:
        """The options dataclass of ``kind`` (``"invert"`` or ``"edit"``)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls.invert_options_type if kind == "invert" else cls.edit_options_type

    def invert_options_of(self, options: Mapping[str, Any] | MethodOptions) -> MethodOptions:
        """``invert``'s keyword options as its dataclass (unknown names and bad values raise)."""
        return self.invert_options_type.of(options, self.name, "invert")

    def edit_options_of(self, options: Mapping[str, Any] | MethodOptions) -> MethodOptions:
        """``edit``'s keyword options as its dataclass (unknown names and bad values raise)."""
        return self.edit_options_type.of(options, self.name, "edit")

    def recorded_options(self, inv: Inversion) -> MethodOptions:
        """The options ``inv`` was made with (files that lack one get its default)."""
        return self.invert_options_of(inv.options)

    # ------------------------------------------------------------------ inversion
    def invert(
        self,
        model,
        z0: torch.Tensor,
        source_prompt: str,
        steps: int,
        guidance: float,
        schedule_mode: str,
        progress: bool,
        **options: Any,
    ) -> Inversion:
        """Invert latents ``z0 (1, C, h, w)`` described by ``source_prompt`` in ``steps``
        steps of the ``schedule_mode`` spacing, for guidance ``guidance``."""
        opts = self.prepare(model, source_prompt, self.invert_options_of(options))
        started, calls = time.perf_counter(), counters(model)
        schedule = make_schedule(model.scheduler_config, steps, schedule_mode)
        tensors, stats = self._invert(model, z0, source_prompt, schedule, guidance, opts, progress)
        work = {"unet_calls": model.unet_calls - calls[0], "unet_image_forwards": model.unet_image_forwards - calls[1]}
        return self._record(
            model, z0, source_prompt, (schedule, schedule_mode), guidance, opts, tensors, work, stats, started
        )

    #: the inversion is the DDIM pivot alone (no per-image optimisation or draws), so the
    #: inversions of several images can share their UNet calls (:meth:`invert_many`)
    pivot_only: ClassVar[bool] = False

    def invert_many(
        self,
        model,
        z0s: Sequence[torch.Tensor],
        source_prompts: Sequence[str],
        steps: int,
        guidance: float,
        schedule_mode: str,
        progress: bool,
        **options: Any,
    ) -> list[Inversion]:
        """:meth:`invert` of several latents ``(1, C, h, w)``, each with its prompt: for a
        :attr:`pivot_only` method one DDIM inversion of them all, ``ε`` of the batch of
        their latents at each step (N UNet calls in all, each inversion recording its own
        rows); otherwise one after the other."""
        if not self.pivot_only or len(z0s) == 1:
            return [
                self.invert(model, z0, prompt, steps, guidance, schedule_mode, progress, **options)
                for z0, prompt in zip(z0s, source_prompts, strict=True)
            ]
        opts = [self.prepare(model, prompt, self.invert_options_of(options)) for prompt in source_prompts]
        started = time.perf_counter()
        schedule = make_schedule(model.scheduler_config, steps, schedule_mode)
        batch = torch.cat([z.to(model.device, model.latent_dtype) for z in z0s])
        traj = ddim_invert_batch(model, batch, embed(model, list(source_prompts)), schedule, progress)
        work = {"unet_calls": schedule.num_steps, "unet_image_forwards": schedule.num_steps}
        return [
            self._record(
                model,
                z0,
                prompt,
                (schedule, schedule_mode),
                guidance,
                o,
                {"trajectory": traj[:, k]},
                work,
                {},
                started,
            )
            for k, (z0, prompt, o) in enumerate(zip(z0s, source_prompts, opts, strict=True))
        ]

    def _record(self, model, z0, source_prompt, schedules, guidance, opts, tensors, work, stats, started):
        """The :class:`Inversion` of ``z0``: its tensors, the options, the UNet ``work``, the
        method's ``stats`` and the time since ``started``; ``schedules``: (schedule, its mode)."""
        schedule, schedule_mode = schedules
        meta = schedule.to_metadata()
        meta["mode"] = schedule_mode
        return Inversion(
            method=self.name,
            model=model.fingerprint(),
            source_prompt=source_prompt,
            num_steps=schedule.num_steps,
            guidance=float(guidance),
            schedule=meta,
            image_size=model.image_size,
            tensors={k: v.detach().to("cpu", model.latent_dtype) for k, v in {"z0": z0, **tensors}.items()},
            options=opts.to_record(),
            stats={**work, "seconds": round(time.perf_counter() - started, 4), **stats},
        )

    def prepare(self, model, source_prompt: str, options: MethodOptions) -> MethodOptions:
        """The options to invert with, where they depend on the model or the prompt
        (prompt-tuning's ``init_prompt``); checked before any work. Default: unchanged."""
        return options

    def _invert(
        self,
        model,
        z0: torch.Tensor,
        source_prompt: str,
        schedule: Schedule,
        guidance: float,
        options: MethodOptions,
        progress: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The method's inversion: its tensors (name → tensor, besides ``z0``) and any
        statistics beyond the UNet counts and time (e.g. per-step losses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ editing
    def edit(
        self,
        model,
        inv: Inversion,
        targets: Sequence[str],
        guidance: float,
        controller: Controller | None,
        with_source: bool,
        progress: bool,
        **options: Any,
    ) -> EditOutput:
        """Edit ``inv`` towards each of ``targets`` at ``guidance``; branch 0 is the source
        when ``with_source`` (or the controller reads it)."""
        opts = self.edit_options_of(options)
        schedule = schedule_of(model, inv)
        return self._edit(model, inv, schedule, targets, guidance, controller, with_source, progress, opts)

    def _edit(
        self,
        model,
        inv: Inversion,
        schedule: Schedule,
        targets: Sequence[str],
        guidance: float,
        controller: Controller | None,
        with_source: bool,
        progress: bool,
        options: MethodOptions,
    ) -> EditOutput:
        """Run :meth:`program` through the loop driver (EDICT runs its own loop instead)."""
        job = self._edit_job(model, inv, schedule, targets, guidance, controller, with_source, options)
        desc = f"edit ({self.name})"
        result = loop.run(model, job.program, job.controller, job.context, progress=progress, desc=desc)
        return self.edit_output(job, result)

    #: the edit runs through the loop driver, so it can share UNet calls with other edits
    #: (:meth:`edit_job`, :func:`pyinv.loop.run_shared`); EDICT runs its own loop
    shares_calls: ClassVar[bool] = True

    def edit_job(
        self,
        model,
        inv: Inversion,
        targets: Sequence[str],
        guidance: float,
        controller: Controller | None,
        with_source: bool,
        **options: Any,
    ) -> loop.EditJob:
        """:meth:`edit` up to the loop: the program, the controller and the plan's context,
        for :func:`pyinv.loop.run_shared` (then :meth:`edit_output`). Only for methods that
        :attr:`shares_calls`."""
        if not self.shares_calls:
            raise PyinvError(f"{self.name} runs its own sampling loop; its edits cannot share UNet calls")
        opts = self.edit_options_of(options)
        schedule = schedule_of(model, inv)
        return self._edit_job(model, inv, schedule, targets, guidance, controller, with_source, opts)

    def _edit_job(self, model, inv, schedule, targets, guidance, controller, with_source, options) -> loop.EditJob:
        needs_source = with_source or bool(controller and controller.reads_source)
        program = self.program(model, inv, schedule, targets, guidance, needs_source, options)
        if controller is not None:
            program = controller.prepare(model, program, inv.source_prompt, list(targets))
        context = EditContext(inv.source_prompt, tuple(targets), self.control_defaults)
        return loop.EditJob(program, controller, context)

    @staticmethod
    def edit_output(job: loop.EditJob, result: loop.LoopResult) -> EditOutput:
        """The :class:`EditOutput` of a job's loop result."""
        lat = result.latents
        has_source = job.program.has_source
        return EditOutput(
            targets=lat[1:] if has_source else lat,
            source=lat[:1] if has_source else None,
            unet_calls=result.unet_calls,
            unet_image_forwards=result.unet_image_forwards,
            batch_rows=result.layout.rows,
        )

    def program(
        self,
        model,
        inv: Inversion,
        schedule: Schedule,
        targets: Sequence[str],
        guidance: float,
        with_source: bool,
        options: MethodOptions,
    ) -> loop.EditProgram:
        """The edit as a program of the loop driver: branch 0 the source when ``with_source``,
        then one branch per target prompt."""
        raise NotImplementedError


def schedule_of(model, inv: Inversion) -> Schedule:
    """Rebuild the schedule an inversion was made with: its recorded mode, or the mode whose
    timesteps it holds (files written before ``reference`` meant 981 … 1 hold 980 … 0, which
    is ``leading``)."""
    recorded = inv.schedule.get("mode", "reference")
    stored = [int(t) for t in inv.schedule["timesteps"]]
    for mode in (recorded, *(m for m in SCHEDULE_MODES if m != recorded)):
        sched = make_schedule(model.scheduler_config, inv.num_steps, mode)
        if list(sched.timesteps) == stored:
            return sched
    raise PyinvError("the inversion's timesteps do not match this model's scheduler")


def counters(model) -> tuple[int, int]:
    return model.unet_calls, model.unet_image_forwards


@torch.no_grad()
def ddim_invert(
    model, z0: torch.Tensor, cond: torch.Tensor, schedule: Schedule, progress: bool = False
) -> torch.Tensor:
    """DDIM inversion (the pivot): ``z*_0 = z0``; for t = 1, 21, …, 981 (ascending)
    ``ε = ε(z*_{prev(t)}, t, c)`` (conditional only, one UNet call) and the DDIM move from
    level prev(t) to t. Returns the trajectory ``(N+1, C, h, w)``: index 0 is ``z0``,
    index k the latent at ``timesteps[N−k]`` (for ``B`` latents, ``((N+1)·B, C, h, w)``).
    """
    return ddim_invert_batch(model, z0, cond, schedule, progress).flatten(0, 1)


@torch.no_grad()
def ddim_invert_batch(
    model, z0: torch.Tensor, cond: torch.Tensor, schedule: Schedule, progress: bool = False
) -> torch.Tensor:
    """:func:`ddim_invert` of a batch ``z0 (B, C, h, w)`` with ``cond (B, L, D)``, one UNet
    call per step for all: trajectories ``(N+1, B, C, h, w)``."""
    z = z0.to(model.device, model.latent_dtype)
    traj = [z]
    pred = schedule.prediction_type
    for t in tqdm(list(reversed(schedule.timesteps)), desc="DDIM inversion", disable=not progress, leave=False):
        a_from, a_to = schedule.alpha(schedule.prev_timestep(t)), schedule.alpha(t)
        out = model.unet_forward(z, t, cond)
        # The UNet is evaluated at timestep t on the latent at level prev(t) (reference's next_step).
        z = ddim_step(out, z, a_from, a_to, pred)
        traj.append(z)
    return torch.stack(traj)


def embed(model, prompts: Sequence[str]) -> torch.Tensor:
    return model.encode_prompts(list(prompts))
