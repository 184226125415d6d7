"""Negative-prompt inversion (NPI, arXiv 2305.16807): no optimisation.

Inversion is DDIM inversion with ``c_src``. Editing replaces the null embedding ∅ by
``c_src`` in every branch: target ``ε(c_src) + w (ε(c_tgt) − ε(c_src))``; the source branch
reduces to ``ε(c_src)``, exactly the inversion's prediction, so it reconstructs like the
guidance-1 DDIM reconstruction.
"""

from __future__ import annotations

import torch

from ..loop import EditProgram
from .base import embed
from .ddim import DDIMInversion


class NegativePromptInversion(DDIMInversion):
    name = "negative-prompt"
    summary = "DDIM inversion; the source prompt replaces the null text in CFG"

    def program(self, model, inv, schedule, targets, guidance, with_source, options):
        prompts = ([inv.source_prompt] if with_source else []) + list(targets)
        B = len(prompts)
        src = embed(model, [inv.source_prompt])
        guide = torch.full((B,), float(guidance))
        if with_source:
            guide[0] = 1.0  # ε(c_src) + w (ε(c_src) − ε(c_src)) = ε(c_src): one pass is enough
        return EditProgram(
            schedule=schedule,
            start=inv["trajectory"][-1:].to(model.device).expand(B, -1, -1, -1),
            uncond=src.expand(B, -1, -1),
            cond=embed(model, prompts),
            guidance=guide,
            has_source=with_source,
        )
