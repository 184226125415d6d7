"""The controller interface: a controller plans an edit's control as data.

A controller holds only its settings. For one edit it

1. may adapt the edit's program before the batch is laid out (:meth:`Controller.prepare`,
   PnP's negative prompt and guidance-1 source) — returning a new program, never changing
   itself;
2. builds, from the prompts, the schedule and the batch layout, a :class:`ControlPlan`
   (:meth:`Controller.plan`): the per-step control as fixed-shape tensors, stacked over the
   steps, and a :class:`ControlRule` that says which layers they act on and how.

The loop asks the plan for each step's :class:`StepControl` and hands it to the UNet call;
the processors installed once per model (:mod:`pyinv.control.attention`) apply it. Nothing in
the model or the controller changes during an edit, so one controller object or one model
serves any number of edits at once. :class:`NoControl` is prompt swap: no control at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class EditContext:
    """What a plan is built for besides the program and the layout: the source prompt, the
    target prompts (in branch order) and the inversion method's reference values for
    controllers (``Method.control_defaults``: controller kind → settings)."""

    source_prompt: str
    targets: tuple[str, ...]
    method_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ControlRule:
    """How an edit's control acts on the UNet: static for the edit (plain values only), with
    the step's tensors coming in each call. Subclasses are frozen keyword-only dataclasses.

    Attributes:
        layers: processor names of the attention layers the rule controls.
        feature_modules: names of the ResNet blocks whose ``conv2`` output it may replace.
    """

    layers: frozenset[str] = frozenset()
    feature_modules: frozenset[str] = frozenset()

    #: how each step input is merged when edits share a UNet call (:mod:`pyinv.control.shared`):
    #: ``"index"`` (row indices), ``"concat"`` (per row or per target) or ``"stack"`` (per edit)
    shared_inputs: ClassVar[dict[str, str]] = {}

    def attend(self, name: str, q, k, v, scale: float, call) -> torch.Tensor:
        """``(R, H, n, d)`` attention output of layer ``name`` under ``call.step``."""
        raise NotImplementedError

    def features(self, name: str, output: torch.Tensor, call) -> torch.Tensor | None:
        """The ``conv2`` output ``(R, C, h, w)`` of block ``name`` under ``call.step``."""
        return None

    # -------------------------------------------------------- sharing a call (control.shared)
    def share_identity(self) -> ControlRule | None:
        """The rule with its row numbers cleared: rules with equal identities can share a UNet
        call. ``None`` (the default): this rule does not say how, so it never shares."""
        return None

    def shared(self, steps: list[StepControl], offsets: list[int]) -> tuple[ControlRule, dict[str, torch.Tensor]]:
        """The rule of a call shared by ``steps``' edits (their rows from ``offsets`` on) and
        any inputs it needs besides the merged :attr:`shared_inputs`."""
        return self, {}

    def split_maps(self, maps: torch.Tensor, steps: list[StepControl]) -> list[torch.Tensor]:
        """A shared call's gathered word maps, split back per edit (rules that gather maps)."""
        raise NotImplementedError(f"{type(self).__name__} gathers no maps")


@dataclass(frozen=True)
class StepControl:
    """The control of one UNet call.

    Attributes:
        rule: the edit's :class:`ControlRule`.
        inputs: the step's tensors by name; their names, shapes and dtypes are the same at
            every step of the edit.
        active: the rule's terms applied at this step (every term at every step in a plan
            made with ``graph_static``, so that one traced graph serves all steps).
    """

    rule: ControlRule
    inputs: Mapping[str, torch.Tensor]
    active: frozenset[str]


class ControlPlan:
    """One edit's control, built once before the first step. The base plan controls nothing.

    Attributes:
        maps_shape: ``(1 + T, n)`` of the word maps the UNet calls gather for LocalBlend (the
            loop keeps their running sum), ``None`` without LocalBlend.
    """

    maps_shape: tuple[int, int] | None = None

    def step(self, i: int) -> StepControl | None:
        """The control of sampling step ``i`` (index into the schedule), ``None`` for none."""
        return None

    def blend_mask(self, i: int, maps: torch.Tensor | None) -> torch.Tensor | None:
        """After step ``i``'s UNet call, with the word maps summed over all calls so far: a
        ``(B, 1, h, w)`` mask ``m`` for ``z_b ← z_0 + m_b (z_b − z_0)`` in the step op, or ``None``."""
        return None

    def after_step(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """Called with the stepped latents ``(B, C, h, w)``; returns them (maybe changed)."""
        return latents


class Controller:
    """Base controller: reads nothing, changes nothing (prompt swap).

    Attributes:
        reads_source: source passes the controller reads, any of {"uncond", "cond"} (the loop
            runs the source branch's passes only when something reads them).
        graph_static: plans apply every term at every step (identity indices, zero matrices
            outside the windows), as a compiled or exported UNet needs for one graph over all
            steps; ``False``: a step skips the terms that are no-ops at it; ``None`` (the
            default): ``True`` exactly when the model's UNet is traced (``torch.compile``).
    """

    reads_source: frozenset[str] = frozenset()
    graph_static: bool | None = None

    def static_for(self, model) -> bool:
        """Whether this edit's plan applies every term at every step (see ``graph_static``)."""
        if self.graph_static is not None:
            return self.graph_static
        return bool(getattr(model, "traced_unet", False))

    def check_prompts(self, model, source_prompt: str, targets: list[str], num_steps: int | None = None) -> None:
        """Fail early (before any UNet work) when the prompts (or the step count, when
        known) do not suit the controller."""

    def prepare(self, model, program, source_prompt: str, targets: list[str]):
        """The edit's program, adapted to the controller where it needs that (a new one)."""
        return program

    def plan(self, model, program, layout, context: EditContext) -> ControlPlan:
        """The edit's :class:`ControlPlan` for ``layout`` (a :class:`~pyinv.loop.BatchLayout`)."""
        return ControlPlan()


class NoControl(Controller):
    """Prompt swap: the target branches are sampled with their prompts and nothing else."""


class StepTable(ControlPlan):
    """A plan whose step control is read from tables built once: ``per_step`` tensors stacked
    over the steps run (``(S, …)``, row ``i − first_step``), ``constant`` tensors the same at
    every step, and the terms active at each step (all of ``terms`` with ``static``).

    Every table is its own tensor, so a step's inputs never alias one another.
    """

    def __init__(
        self,
        rule: ControlRule,
        first_step: int,
        per_step: Mapping[str, torch.Tensor],
        constant: Mapping[str, torch.Tensor],
        active: list[frozenset[str]],
        terms: frozenset[str],
        static: bool,
    ):
        self.rule = rule
        self.first_step = first_step
        self.per_step = dict(per_step)
        self.constant = dict(constant)
        self.active = [terms if static else a for a in active]

    def step(self, i: int) -> StepControl:
        k = i - self.first_step
        inputs = {name: table[k] for name, table in self.per_step.items()}
        inputs.update(self.constant)
        return StepControl(self.rule, inputs, self.active[k])
