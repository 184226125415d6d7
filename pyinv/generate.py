"""Text-to-image sampling: DDIM from seeded noise with classifier-free guidance.

Each image starts from ``z_T ~ N(0, I)`` drawn by a CPU generator seeded with its own
seed, so an image depends only on (model, prompt, seed, steps, guidance), not on what else
is in the batch or on the device. Sampling runs through the same loop driver as editing
(:func:`pyinv.loop.run`): per step ``ε̂ = ε(∅) + w (ε(c) − ε(∅))`` (v-prediction likewise),
then the DDIM step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import PyinvError
from .loop import EditProgram, run
from .schedule import make_schedule


def initial_noise(model, seeds: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), C, h, w)`` standard normal latents, one seeded draw per image."""
    shape = (model.latent_channels, model.latent_size, model.latent_size)
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(draws).to(device=model.device, dtype=model.latent_dtype)


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str = "",
    schedule: str = "reference",
    progress: bool = False,
) -> torch.Tensor:
    """Latents ``(B, C, h, w)`` of ``prompts[k]`` sampled from ``seeds[k]``, as one batch."""
    if len(prompts) != len(seeds):
        raise PyinvError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise PyinvError("no prompt given")
    try:
        sched = make_schedule(model.scheduler_config, steps, schedule)
    except ValueError as exc:
        raise PyinvError(str(exc)) from None
    B = len(prompts)
    program = EditProgram(
        schedule=sched,
        start=initial_noise(model, seeds),
        uncond=model.encode_prompts([negative_prompt]).expand(B, -1, -1),
        cond=model.encode_prompts(list(prompts)),
        guidance=torch.full((B,), float(guidance)),
    )
    return run(model, program, progress=progress, desc="generate").latents
