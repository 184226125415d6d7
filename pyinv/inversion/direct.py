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

from dataclasses import dataclass

import torch

from ..errors import PyinvError
from ..loop import EditProgram
from .base import Method, ddim_invert, embed
from .options import MethodOptions, option

FORMS = ("pinned", "offsets")


@dataclass(frozen=True)
class DirectOptions(MethodOptions):
    """Direct Inversion's inversion options (recorded in the inversion; the edit reads them)."""

    form: str = option("pinned", "pin the source branch or use offsets", flag="--form", choices=FORMS)

    def __post_init__(self):
        if self.form not in FORMS:
            raise PyinvError(f"unknown Direct Inversion form {self.form!r}; use one of {', '.join(FORMS)}")


class DirectInversion(Method):
    name = "direct"
    summary = "DDIM inversion; the source branch is pinned to the pivot, the target edits freely"
    invert_options_type = DirectOptions
    pivot_only = True
    tensors = ("trajectory",)

    def _invert(self, model, z0, source_prompt, schedule, guidance, options, progress):
        """The pivot ``trajectory (N+1, C, h, w)`` with ``c_src``; either form edits from it."""
        return {"trajectory": ddim_invert(model, z0, embed(model, [source_prompt]), schedule, progress)}, {}

    def program(self, model, inv, schedule, targets, guidance, with_source, options):
        form = self.recorded_options(inv).form
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
