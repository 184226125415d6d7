"""The controller interface the denoising loop drives.

A controller says which source passes it reads (so the loop can drop the rest), is
installed on the UNet for the duration of an edit (attention processors, forward hooks),
is told the batch layout at the start of each step, and may adjust the latents after the
step (LocalBlend). :class:`NoControl` is prompt swap: no attention control at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    """Which branch and which pass each row of the UNet batch is.

    ``rows[r] = (branch, kind)`` with kind ``"uncond"`` or ``"cond"``; branch 0 is the
    source when ``has_source``. Unconditional rows come first, as in diffusers.
    """

    rows: tuple[tuple[int, str], ...]
    num_branches: int
    has_source: bool

    def row_of(self, branch: int, kind: str) -> int | None:
        for r, row in enumerate(self.rows):
            if row == (branch, kind):
                return r
        return None

    @property
    def size(self) -> int:
        return len(self.rows)


class Controller:
    """Base controller: reads nothing, changes nothing (prompt swap).

    The driver calls, per edit: :meth:`use_method_defaults`, :meth:`prepare` (before anything runs: check the prompts,
    build per-edit tensors, maybe adapt the program), :meth:`install` (with the batch
    layout), then per step :meth:`begin_step`, the UNet call, :meth:`blend_mask` (a mask
    for the step op's LocalBlend mix), the step op and :meth:`after_step`; finally
    :meth:`remove`, also when the edit fails.
    """

    #: source passes the controller reads: any of {"uncond", "cond"}
    reads_source: frozenset[str] = frozenset()

    def check_prompts(self, model, source_prompt: str, targets: list[str], num_steps: int | None = None) -> None:
        """Fail early (before any UNet work) when the prompts (or the step count, when
        known) do not suit the controller."""

    def use_method_defaults(self, defaults: dict) -> None:
        """Told, before :meth:`prepare`, the inversion method's reference values for controllers
        (``Method.control_defaults``: controller kind → settings); P2P takes its windows there."""

    def prepare(self, model, program, source_prompt: str, targets: list[str]):
        """Check the edit's prompts and build what the controller needs; returns the program."""
        return program

    def install(self, model, layout: BatchLayout, program) -> None:
        """Attach to ``model.unet`` for one edit (attention processors, hooks)."""

    def remove(self, model) -> None:
        """Detach from ``model.unet``, restoring what :meth:`install` replaced."""

    def begin_step(self, step: int, timestep: int) -> None:
        """Called before the UNet call of sampling step ``step`` (index into the schedule)."""

    def blend_mask(self, step: int) -> torch.Tensor | None:
        """After the UNet call: ``(B, 1, h, w)`` mask ``m`` for ``z_b ← z_0 + m_b (z_b − z_0)``
        in the step op (LocalBlend), or ``None``."""
        return None

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Called with the stepped latents ``(B, C, h, w)``; returns them (maybe changed)."""
        return latents


class NoControl(Controller):
    """Prompt swap: the target branches are sampled with their prompts and nothing else."""
