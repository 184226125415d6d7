"""Prompt-tuning inversion (PTI, ICCV 2023, arXiv 2305.04441).

Stage 1: DDIM inversion with the unconditional embedding (the paper's ω = 0), or with the
source prompt when one is given. Then per step a *conditional* embedding ``c*_t`` is
optimised like NTI's null text (slot c, same K, lr and early stop), initialised from the
source prompt's embedding when given, else from ``init_prompt`` (the target prompt).
Stage 2, editing: condition on ``c̃_t = η · c_tgt + (1 − η) · c*_t`` (η = 0.8) with
ordinary CFG from ``z*_T``; the source branch uses ``c*_t`` itself (a reconstruction).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..errors import PyinvError
from ..loop import EditProgram
from ..schedule import make_schedule
from .base import Method, counters, ddim_invert, embed, schedule_of
from .optimise import check_options, optimise_embeddings
from .record import Inversion


class PromptTuningInversion(Method):
    name = "prompt-tuning"
    summary = "DDIM pivot + per-step optimised conditional embeddings, blended with the target"
    needs_source_prompt = False
    tensors = ("trajectory", "cond_embeddings")
    invert_options = {"inner_steps": 10, "epsilon": 1e-5, "init_prompt": None}
    edit_options = {"eta": 0.8}

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
        init_prompt: str | None = None,
        **options,
    ):
        inner_steps, epsilon = check_options(inner_steps, epsilon)
        init_text = source_prompt or init_prompt
        if init_text is not None:
            model.check_prompt_length(init_text, "init_prompt")
        if not init_text:
            raise PyinvError("prompt-tuning inversion needs a source prompt or an init prompt (the target prompt)")
        started, calls = time.perf_counter(), counters(model)
        schedule = make_schedule(model.scheduler_config, steps, schedule_mode)
        pivot = embed(model, [source_prompt])  # "" → the unconditional embedding (ω = 0)
        traj = ddim_invert(model, z0, pivot, schedule, progress)
        conds, first, last, iters = optimise_embeddings(
            model,
            traj,
            embed(model, [init_text]),
            embed(model, [""]),
            schedule,
            guidance,
            "cond",
            inner_steps=inner_steps,
            epsilon=epsilon,
            progress=progress,
            desc="prompt tuning",
        )
        inv = self.make_record(
            model,
            z0,
            source_prompt,
            schedule,
            guidance,
            {"trajectory": traj, "cond_embeddings": conds},
            {"inner_steps": inner_steps, "epsilon": epsilon, "init_prompt": init_text},
            started,
            calls,
            schedule_mode,
        )
        inv.stats.update(loss_first=first, loss_last=last, inner_iterations=iters)
        return inv

    def program(
        self,
        model,
        inv: Inversion,
        targets: Sequence[str],
        guidance: float,
        with_source: bool,
        eta: float = 0.8,
        **options,
    ):
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0.0 <= eta <= 1.0:
            raise PyinvError(f"prompt-tuning eta must be in [0, 1], got {eta}")
        schedule = schedule_of(model, inv)
        B = len(targets) + int(with_source)
        tuned = inv["cond_embeddings"].to(model.device)
        tgt = embed(model, list(targets) or [""])[: len(targets)]  # no rows for a reconstruction
        weights = torch.full((B, 1, 1), float(eta), device=model.device)
        if with_source:
            tgt = torch.cat([torch.zeros_like(tuned[:1]), tgt])  # the source's row: weight 0 below
            weights[0] = 0.0

        def cond(i: int) -> torch.Tensor:
            return weights * tgt + (1.0 - weights) * tuned[i : i + 1]

        return EditProgram(
            schedule=schedule,
            start=inv["trajectory"][-1:].to(model.device).expand(B, -1, -1, -1),
            uncond=embed(model, [""]).expand(B, -1, -1),
            cond=cond,
            guidance=torch.full((B,), float(guidance)),
            has_source=with_source,
        )
