"""What every inversion method provides, and the pieces they share.

A method inverts (``invert`` → :class:`Inversion`) and describes its edit as an
:class:`~pyinv.loop.EditProgram` (``program``) that the one loop driver runs. Branch 0 is
the source when the edit needs one; the rest are the target prompts, in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from .. import loop
from ..control.base import Controller, EditContext
from ..errors import PyinvError
from ..schedule import SCHEDULE_MODES, Schedule, ddim_step, make_schedule
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
    """Base class of the inversion methods (see ``METHODS.md`` for each algorithm)."""

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
    invert_options: ClassVar[dict[str, Any]] = {}
    edit_options: ClassVar[dict[str, Any]] = {}
    #: controller settings of the reference that pairs a controller with this method, by
    #: controller kind (``{"p2p": {"cross_replace": …, "self_replace": …, "self_max_tokens": …}}``);
    #: used where the user gave none
    control_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    #: tensors an inversion of this method must hold (besides z0) for editing
    tensors: ClassVar[tuple[str, ...]] = ()

    def required_tensors(self, inv: Inversion) -> tuple[str, ...]:
        return self.tensors

    # ------------------------------------------------------------------ API for subclasses
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
        raise NotImplementedError

    def program(
        self,
        model,
        inv: Inversion,
        targets: Sequence[str],
        guidance: float,
        with_source: bool,
        **options: Any,
    ) -> loop.EditProgram:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared driver
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
        """Run the edit through the loop driver; branch 0 is the source when present."""
        needs_source = with_source or bool(controller and controller.reads_source)
        program = self.program(model, inv, targets, guidance, needs_source, **options)
        if controller is not None:
            program = controller.prepare(model, program, inv.source_prompt, list(targets))
        context = EditContext(inv.source_prompt, tuple(targets), self.control_defaults)
        result = loop.run(model, program, controller, context, progress=progress, desc=f"edit ({self.name})")
        lat = result.latents
        source = lat[:1] if program.has_source else None
        return EditOutput(
            targets=lat[1:] if program.has_source else lat,
            source=source,
            unet_calls=result.unet_calls,
            unet_image_forwards=result.unet_image_forwards,
            batch_rows=result.layout.rows,
        )

    # ------------------------------------------------------------------ helpers
    def make_record(
        self,
        model,
        z0: torch.Tensor,
        source_prompt: str,
        schedule: Schedule,
        guidance: float,
        tensors: dict[str, torch.Tensor],
        options: dict[str, Any],
        started: float,
        calls: tuple[int, int],
        schedule_mode: str,
    ) -> Inversion:
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
            options=options,
            stats={
                "unet_calls": model.unet_calls - calls[0],
                "unet_image_forwards": model.unet_image_forwards - calls[1],
                "seconds": round(time.perf_counter() - started, 4),
            },
        )


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
    index k the latent at ``timesteps[N−k]``.
    """
    z = z0.to(model.device, model.latent_dtype)
    traj = [z]
    pred = schedule.prediction_type
    for t in tqdm(list(reversed(schedule.timesteps)), desc="DDIM inversion", disable=not progress, leave=False):
        a_from, a_to = schedule.alpha(schedule.prev_timestep(t)), schedule.alpha(t)
        out = model.unet_forward(z, t, cond)
        # The UNet is evaluated at timestep t on the latent at level prev(t) (reference's next_step).
        z = ddim_step(out, z, a_from, a_to, pred)
        traj.append(z)
    return torch.cat(traj, dim=0)


def embed(model, prompts: Sequence[str]) -> torch.Tensor:
    return model.encode_prompts(list(prompts))
