"""Direct Inversion / "PnP Inversion" (arXiv 2310.01506).

Pivot: DDIM inversion with ``c_src``. The edit runs the source branch and the target
branches together; the target is never corrected. Two equivalent forms:

- ``form="offsets"`` (the reference's structure): the source branch runs full CFG at the
  inversion's w, and every editing step adds
  ``o_{prev(t)} = z*_{prev(t)} − DDIM(z_src,t → prev(t), ε̃(z_src,t; ∅, c_src, w))`` to it.
  The reference computes ``o`` in a separate pass over the pivot laid out as its edit
  (batch 4); here ``o`` is computed in the edit's own loop from the source's outputs of the
  same UNet call (:class:`~pyinv.loop.EditProgram` ``source_offsets``): the same value in
  exact arithmetic (``z_src,t = z*_t``), and exact for the batch it is applied in whatever
  that batch is. (A separate pass rounds differently wherever its batch size or attention
  processors differ from the edit's, and the source then drifts off the pivot step after
  step: 2e-4 after 50 steps on the tiny model in fp32 with a batch-2 pass.) No offset pass,
  no stored offsets.
- ``form="pinned"`` (default): after each step the source latent is set to ``z*_{prev(t)}``.
  The source's passes run only when the controller reads them (P2P reads the conditional
  one: batch 3 instead of 4; prompt swap reads none: batch 2).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..errors import PyinvError
from ..loop import EditProgram
from ..schedule import make_schedule
from .base import Method, counters, ddim_invert, embed, schedule_of
from .record import Inversion

FORMS = ("pinned", "offsets")


class DirectInversion(Method):
    name = "direct"
    summary = "DDIM inversion; the source branch is pinned to the pivot, the target edits freely"
    invert_options = {"form": "pinned"}
    tensors = ("trajectory",)

    def invert(self, model, z0, source_prompt, steps, guidance, schedule_mode, progress, form="pinned", **options):
        if form not in FORMS:
            raise PyinvError(f"unknown Direct Inversion form {form!r}; use one of {', '.join(FORMS)}")
        started, calls = time.perf_counter(), counters(model)
        schedule = make_schedule(model.scheduler_config, steps, schedule_mode)
        cond = embed(model, [source_prompt])
        traj = ddim_invert(model, z0, cond, schedule, progress)
        tensors = {"trajectory": traj}
        return self.make_record(
            model, z0, source_prompt, schedule, guidance, tensors, {"form": form}, started, calls, schedule_mode
        )

    def program(self, model, inv: Inversion, targets: Sequence[str], guidance: float, with_source: bool, **options):
        schedule = schedule_of(model, inv)
        form = inv.options.get("form", "pinned")
        # The offsets form corrects a source branch that is stepped, so it always has one.
        with_source = with_source or form == "offsets"
        prompts = ([inv.source_prompt] if with_source else []) + list(targets)
        B = len(prompts)
        traj = inv["trajectory"].to(model.device)
        guide = torch.full((B,), float(guidance))
        if with_source:
            guide[0] = inv.guidance  # the source runs at the guidance its correction was made for
        return EditProgram(
            schedule=schedule,
            start=traj[-1:].expand(B, -1, -1, -1),
            uncond=embed(model, [""]).expand(B, -1, -1),
            cond=embed(model, prompts),
            guidance=guide,
            has_source=with_source,
            source_pin=traj if with_source else None,
            source_offsets=form == "offsets",
        )
