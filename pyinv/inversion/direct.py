"""Direct Inversion / "PnP Inversion" (arXiv 2310.01506).

Pivot: DDIM inversion with ``c_src``. The edit runs the source branch and the target
branches together; the target is never corrected. Two exactly equivalent forms:

- ``form="offsets"`` (the reference): a separate pass over the pivot computes
  ``o_{prev(t)} = z*_{prev(t)} − DDIM(z*_t → prev(t), ε̃(z*_t; ∅, c_src, w))`` and every
  editing step adds ``o`` to the source branch (which runs full CFG at the inversion's w).
- ``form="pinned"`` (default): after each step the source latent is set to ``z*_{prev(t)}``.
  No offset pass; the source's passes run only when the controller reads them (P2P reads
  the conditional one: batch 3 instead of 4; prompt swap reads none: batch 2).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import PyinvError
from ..loop import EditProgram
from ..schedule import ddim_step, guided, make_schedule
from .base import Method, counters, ddim_invert, embed, schedule_of
from .record import Inversion

FORMS = ("pinned", "offsets")


@torch.no_grad()
def direct_offsets(
    model, traj: torch.Tensor, null: torch.Tensor, cond: torch.Tensor, schedule, guidance: float, progress: bool = False
) -> torch.Tensor:
    """The reference's offset pass: ``(N, C, h, w)``, row i for sampling step i."""
    n = schedule.num_steps
    offsets = []
    emb = torch.cat([null, cond])
    for i in tqdm(range(n), desc="offsets", disable=not progress, leave=False):
        t, a_t, a_s = schedule.step_alphas(i)
        z_t = traj[n - i : n - i + 1]
        out_u, out_c = model.unet_forward(torch.cat([z_t, z_t]), t, emb).chunk(2)
        rec = ddim_step(guided(out_u, out_c, guidance), z_t, a_t, a_s, schedule.prediction_type)
        offsets.append(traj[n - i - 1 : n - i] - rec)
    return torch.cat(offsets)


class DirectInversion(Method):
    name = "direct"
    summary = "DDIM inversion; the source branch is pinned to the pivot, the target edits freely"
    invert_options = {"form": "pinned"}
    tensors = ("trajectory",)

    def required_tensors(self, inv: Inversion) -> tuple[str, ...]:
        return ("trajectory", "offsets") if inv.options.get("form") == "offsets" else ("trajectory",)

    def invert(self, model, z0, source_prompt, steps, guidance, schedule_mode, progress, form="pinned", **options):
        if form not in FORMS:
            raise PyinvError(f"unknown Direct Inversion form {form!r}; use one of {', '.join(FORMS)}")
        started, calls = time.perf_counter(), counters(model)
        schedule = make_schedule(model.scheduler_config, steps, schedule_mode)
        cond = embed(model, [source_prompt])
        traj = ddim_invert(model, z0, cond, schedule, progress)
        tensors = {"trajectory": traj}
        if form == "offsets":
            tensors["offsets"] = direct_offsets(model, traj, embed(model, [""]), cond, schedule, guidance, progress)
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
            source_pin=traj if (with_source and form == "pinned") else None,
            source_offsets=inv["offsets"].to(model.device) if form == "offsets" else None,
        )
