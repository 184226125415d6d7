"""Prompt-tuning inversion (PTI, ICCV 2023, arXiv 2305.04441).

Stage 1: DDIM inversion with the unconditional embedding (the paper's ω = 0), or with the
source prompt when one is given. Then per step a *conditional* embedding ``c*_t`` is
optimised like NTI's null text (slot c, same K, lr and early stop), initialised from the
source prompt's embedding when given, else from ``init_prompt`` (the target prompt).
Stage 2, editing: condition on ``c̃_t = η · c_tgt + (1 − η) · c*_t`` (η = 0.8) with
ordinary CFG from ``z*_T``; the source branch uses ``c*_t`` itself (a reconstruction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..argtypes import unit_float
from ..checks import check_text
from ..errors import PyinvError
from ..loop import EditProgram
from .base import Method, ddim_invert, embed
from .optimise import EmbeddingOptions, optimise_embeddings
from .options import MethodOptions, option


@dataclass(frozen=True)
class PromptTuningOptions(EmbeddingOptions):
    """Prompt-tuning inversion's inversion options (recorded; ``init_prompt`` as the text the
    embeddings started from: the source prompt when one was given)."""

    init_prompt: str | None = option(
        None, "the text the tuned embeddings start from without a source prompt", default_text="the source prompt"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.init_prompt is not None:
            check_text(self.init_prompt, "init_prompt")


@dataclass(frozen=True)
class PromptTuningEditOptions(MethodOptions):
    """Prompt-tuning's edit options: ``eta`` η in [0, 1] blends ``η · c_tgt + (1 − η) · c*_t``."""

    eta: float = option(0.8, "weight of the target prompt, in [0, 1]", flag="--eta", parse=unit_float)

    def __post_init__(self):
        eta = self.eta
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0.0 <= eta <= 1.0:
            raise PyinvError(f"prompt-tuning eta must be in [0, 1], got {eta}")
        object.__setattr__(self, "eta", float(eta))


class PromptTuningInversion(Method):
    name = "prompt-tuning"
    summary = "DDIM pivot + per-step optimised conditional embeddings, blended with the target"
    needs_source_prompt = False
    tensors = ("trajectory", "cond_embeddings")
    invert_options_type = PromptTuningOptions
    edit_options_type = PromptTuningEditOptions

    def prepare(self, model, source_prompt, options):
        """``init_prompt`` becomes the text the embeddings start from: the source prompt when
        one is given, else the ``init_prompt`` given (one of them must be)."""
        init_text = source_prompt or options.init_prompt
        if init_text is not None:
            model.check_prompt_length(init_text, "init_prompt")
        if not init_text:
            raise PyinvError("prompt-tuning inversion needs a source prompt or an init prompt (the target prompt)")
        return dataclasses.replace(options, init_prompt=init_text)

    def _invert(self, model, z0, source_prompt, schedule, guidance, options, progress):
        """The pivot ``trajectory (N+1, C, h, w)`` (with ∅ when the source prompt is empty)
        and the tuned ``cond_embeddings (N, L, D)``; stats as null-text's."""
        pivot = embed(model, [source_prompt])  # "" → the unconditional embedding (ω = 0)
        traj = ddim_invert(model, z0, pivot, schedule, progress)
        conds, first, last, iters = optimise_embeddings(
            model,
            traj,
            embed(model, [options.init_prompt]),
            embed(model, [""]),
            schedule,
            guidance,
            "cond",
            inner_steps=options.inner_steps,
            epsilon=options.epsilon,
            progress=progress,
            desc="prompt tuning",
        )
        tensors = {"trajectory": traj, "cond_embeddings": conds}
        return tensors, {"loss_first": first, "loss_last": last, "inner_iterations": iters}

    def program(self, model, inv, schedule, targets, guidance, with_source, options):
        B = len(targets) + int(with_source)
        tuned = inv["cond_embeddings"].to(model.device)
        tgt = embed(model, list(targets) or [""])[: len(targets)]  # no rows for a reconstruction
        weights = torch.full((B, 1, 1), options.eta, device=model.device)
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
