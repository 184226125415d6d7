"""Per-step embedding optimisation shared by Null-text inversion and Prompt-tuning inversion.

For sampling step i (t = timesteps[i], 981 → 1) with the running latent ``z̄_t``
(``z̄_T = z*_T``) and the DDIM pivot ``z*``:

- the optimised embedding ``e_t`` starts from the previous step's result (the first from ``init``);
- the other CFG branch's output is computed once, without gradient;
- up to K inner Adam steps, lr = 1e-2 · (1 − i/100):
  ``ε̃ = ε(z̄_t, t, ∅) + w (ε(z̄_t, t, c) − ε(z̄_t, t, ∅))`` with ``e_t`` in the ∅ slot (NTI)
  or the c slot (PTI); ``loss = MSE(DDIM(z̄_t → prev(t), ε̃), z*_{prev(t)})``; stop early
  when ``loss < ε + i · 2e-5`` (checked after the step, as the reference does);
- ``z̄_{prev(t)}`` = the full-CFG DDIM step with the optimised ``e_t`` (no gradient).

Runs in fp32 (a fp32 UNet copy when the model is in half precision), as the reference needs.
Returns the per-step embeddings ``(N, L, D)`` and the per-step first/last inner losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..argtypes import positive_int
from ..errors import PyinvError
from ..schedule import Schedule, ddim_step, guided
from .options import MethodOptions, option

Slot = Literal["uncond", "cond"]

#: most optimisation steps per timestep (the references use 10)
MAX_INNER_STEPS = 1000


@dataclass(frozen=True)
class EmbeddingOptions(MethodOptions):
    """Options of the per-step embedding optimisation (Null-text and Prompt-tuning inversion).

    ``inner_steps`` K is an integer in [1, MAX_INNER_STEPS]; ``epsilon`` ε, the early-stop
    threshold (step i stops once ``loss < ε + i · 2e-5``), a finite number ≥ 0 (kept as a float).
    """

    inner_steps: int = option(
        10, "optimisation steps per timestep", flag="--inner-steps", parse=positive_int, metavar="K"
    )
    epsilon: float = option(1e-5, "early-stop loss threshold, plus 2e-5 per step")

    def __post_init__(self):
        k, eps = self.inner_steps, self.epsilon
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_INNER_STEPS:
            raise PyinvError(f"inner_steps must be an integer in [1, {MAX_INNER_STEPS}], got {k!r}")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < float("inf"):
            raise PyinvError(f"epsilon must be a finite number ≥ 0, got {eps!r}")
        object.__setattr__(self, "epsilon", float(eps))


def optimise_embeddings(
    model,
    trajectory: torch.Tensor,
    init: torch.Tensor,
    fixed: torch.Tensor,
    schedule: Schedule,
    guidance: float,
    slot: Slot,
    *,
    inner_steps: int,
    epsilon: float,
    progress: bool = False,
    desc: str = "optimise",
) -> tuple[torch.Tensor, list[float], list[float], list[int]]:
    """See the module docstring. ``init``/``fixed``: ``(1, L, D)``; trajectory ``(N+1, C, h, w)``."""
    n = schedule.num_steps
    pred = schedule.prediction_type
    traj = trajectory.to(model.device, model.latent_dtype)
    fixed = fixed.to(model.device, model.latent_dtype)
    current = init.to(model.device, model.latent_dtype).detach().clone()
    z = traj[n : n + 1]
    results, first_losses, last_losses, iterations = [], [], [], []
    bar = tqdm(total=n * inner_steps, desc=desc, disable=not progress, leave=False)
    for i in range(n):
        t, a_t, a_s = schedule.step_alphas(i)
        target = traj[n - i - 1 : n - i]
        current = current.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([current], lr=1e-2 * (1.0 - i / 100.0))
        with torch.no_grad():
            out_fixed = model.unet_forward_grad(z, t, fixed)
        first = last = float("nan")
        used = 0
        for j in range(inner_steps):
            with torch.enable_grad():
                out_opt = model.unet_forward_grad(z, t, current)
                u, c = (out_opt, out_fixed) if slot == "uncond" else (out_fixed, out_opt)
                rec = ddim_step(guided(u, c, guidance), z, a_t, a_s, pred)
                loss = F.mse_loss(rec, target)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            last = loss.item()
            first = last if j == 0 else first
            used = j + 1
            bar.update(1)
            if last < epsilon + i * 2e-5:
                break
        bar.update(inner_steps - used)
        first_losses.append(first)
        last_losses.append(last)
        iterations.append(used)
        current = current.detach()
        results.append(current)
        with torch.no_grad():
            u_emb, c_emb = (current, fixed) if slot == "uncond" else (fixed, current)
            out_u, out_c = model.unet_forward(torch.cat([z, z]), t, torch.cat([u_emb, c_emb])).chunk(2)
            z = ddim_step(guided(out_u, out_c, guidance), z, a_t, a_s, pred)
    bar.close()
    return torch.cat(results), first_losses, last_losses, iterations
