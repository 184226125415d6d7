"""Null-text inversion (NTI, arXiv 2211.09794): the quality and latency baseline.

Pivot: DDIM inversion with ``c_src``. Then one null embedding ∅_t per step, optimised
(:func:`~pyinv.inversion.optimise.optimise_embeddings`, slot ∅, K = 10, early stop
1e-5 + i·2e-5) so that the w-guided DDIM step lands on the pivot. Editing uses ∅_t in
place of ∅ at step t for every branch; the source branch reconstructs the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loop import EditProgram
from .base import Method, ddim_invert, embed
from .optimise import EmbeddingOptions, optimise_embeddings


@dataclass(frozen=True)
class NullTextOptions(EmbeddingOptions):
    """Null-text inversion's inversion options (recorded): those of the optimisation."""


class NullTextInversion(Method):
    name = "null-text"
    summary = "DDIM pivot + per-step optimised null-text embeddings (fp32)"
    invert_options_type = NullTextOptions
    tensors = ("trajectory", "null_embeddings")

    def _invert(self, model, z0, source_prompt, schedule, guidance, options, progress):
        """The pivot ``trajectory (N+1, C, h, w)`` and ``null_embeddings (N, L, D)``; the stats
        hold each step's first and last inner loss and its inner iterations."""
        cond = embed(model, [source_prompt])
        traj = ddim_invert(model, z0, cond, schedule, progress)
        nulls, first, last, iters = optimise_embeddings(
            model,
            traj,
            embed(model, [""]),
            cond,
            schedule,
            guidance,
            "uncond",
            inner_steps=options.inner_steps,
            epsilon=options.epsilon,
            progress=progress,
            desc="null-text optimisation",
        )
        tensors = {"trajectory": traj, "null_embeddings": nulls}
        return tensors, {"loss_first": first, "loss_last": last, "inner_iterations": iters}

    def program(self, model, inv, schedule, targets, guidance, with_source, options):
        prompts = ([inv.source_prompt] if with_source else []) + list(targets)
        B = len(prompts)
        nulls = inv["null_embeddings"].to(model.device)
        return EditProgram(
            schedule=schedule,
            start=inv["trajectory"][-1:].to(model.device).expand(B, -1, -1, -1),
            uncond=lambda i: nulls[i : i + 1].expand(B, -1, -1),
            cond=embed(model, prompts),
            guidance=torch.full((B,), float(guidance)),
            has_source=with_source,
        )
