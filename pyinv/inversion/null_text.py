"""Null-text inversion (NTI, arXiv 2211.09794): the quality and latency baseline.

Pivot: DDIM inversion with ``c_src``. Then one null embedding ∅_t per step, optimised
(:func:`~pyinv.inversion.optimise.optimise_embeddings`, slot ∅, K = 10, early stop
1e-5 + i·2e-5) so that the w-guided DDIM step lands on the pivot. Editing uses ∅_t in
place of ∅ at step t for every branch; the source branch reconstructs the image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..loop import EditProgram
from ..schedule import make_schedule
from .base import Method, counters, ddim_invert, embed, schedule_of
from .optimise import check_options, optimise_embeddings
from .record import Inversion


class NullTextInversion(Method):
    name = "null-text"
    summary = "DDIM pivot + per-step optimised null-text embeddings (fp32)"
    invert_options = {"inner_steps": 10, "epsilon": 1e-5}
    tensors = ("trajectory", "null_embeddings")

    def invert(
        self,
        model,
        z0,
        source_prompt,
        steps,
        guidance,
        schedule_mode,
        progress,
        inner_steps: int = 10,
        epsilon: float = 1e-5,
        **options,
    ):
        inner_steps, epsilon = check_options(inner_steps, epsilon)
        started, calls = time.perf_counter(), counters(model)
        schedule = make_schedule(model.scheduler_config, steps, schedule_mode)
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
            inner_steps=inner_steps,
            epsilon=epsilon,
            progress=progress,
            desc="null-text optimisation",
        )
        inv = self.make_record(
            model,
            z0,
            source_prompt,
            schedule,
            guidance,
            {"trajectory": traj, "null_embeddings": nulls},
            {"inner_steps": inner_steps, "epsilon": epsilon},
            started,
            calls,
            schedule_mode,
        )
        inv.stats.update(loss_first=first, loss_last=last, inner_iterations=iters)
        return inv

    def program(self, model, inv: Inversion, targets: Sequence[str], guidance: float, with_source: bool, **options):
        schedule = schedule_of(model, inv)
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
