"""DDIM inversion + sampling (arXiv 2010.02502): the plain baseline and the pivot of the others.

Inversion: :func:`~pyinv.inversion.base.ddim_invert` with the source prompt (guidance 1).
Editing: every target branch starts from ``z*_T`` and is sampled with CFG
``ε(∅) + w (ε(c_tgt) − ε(∅))``; the source branch (when a controller needs it) is the
same with ``c_src`` — the guided reconstruction that drifts for w > 1.
"""

from __future__ import annotations

import torch

from ..loop import EditProgram
from .base import Method, ddim_invert, embed


class DDIMInversion(Method):
    name = "ddim"
    summary = "DDIM inversion, then CFG sampling from z*_T"
    pivot_only = True
    tensors = ("trajectory",)

    def _invert(self, model, z0, source_prompt, schedule, guidance, options, progress):
        """The pivot ``trajectory (N+1, C, h, w)`` with ``c_src`` (N UNet calls)."""
        return {"trajectory": ddim_invert(model, z0, embed(model, [source_prompt]), schedule, progress)}, {}

    def program(self, model, inv, schedule, targets, guidance, with_source, options):
        prompts = ([inv.source_prompt] if with_source else []) + list(targets)
        B = len(prompts)
        z_T = inv["trajectory"][-1:].to(model.device)
        null = embed(model, [""])
        return EditProgram(
            schedule=schedule,
            start=z_T.expand(B, -1, -1, -1),
            uncond=null.expand(B, -1, -1),
            cond=embed(model, prompts),
            guidance=torch.full((B,), float(guidance)),
            has_source=with_source,
            source_drifts=True,
        )
