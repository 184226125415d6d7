"""One UNet call for several edits: their batches concatenated, their controls merged.

Edits that run the same timesteps may share each step's UNet call (:func:`pyinv.loop.run_shared`).
Their batches are concatenated row-wise — edit ``e``'s rows ``0 … R_e−1`` become rows
``o_e … o_e+R_e−1`` with ``o_e = R_0 + … + R_{e−1}`` — and the call's control must then do to
each edit's rows exactly what the edit's own control does to them alone. Every controller of
this package expresses its control as row indices and per-row or per-target tensors, so that
is a relabelling:

- ``"index"`` inputs (row indices, e.g. "target row → source row") are concatenated, each
  edit's shifted by ``o_e``;
- ``"concat"`` inputs (one entry per row or per target) are concatenated;
- ``"stack"`` inputs (one per edit, e.g. LocalBlend's source words) are stacked;

as each rule declares in :attr:`~pyinv.control.base.ControlRule.shared_inputs`. A rule says
which of its fields are row numbers (:meth:`~pyinv.control.base.ControlRule.share_identity`:
the rule with them cleared) and builds the shared call's rule
(:meth:`~pyinv.control.base.ControlRule.shared`). Two edits share a call when they have no
control, or rules equal up to row numbers, the same active terms and the same inputs
(:func:`share_key`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import PyinvError
from .base import StepControl

SplitMaps = Callable[[torch.Tensor], list[torch.Tensor]]


def share_key(control: StepControl | None) -> tuple | None:
    """Equal for step controls that can share one UNet call; ``None``: this one shares with
    no other (its rule does not declare how)."""
    if control is None:
        return ("none",)
    identity = control.rule.share_identity()
    if identity is None:
        return None
    inputs = tuple(
        (name, tuple(t.shape[1:]) if control.rule.shared_inputs.get(name) != "stack" else tuple(t.shape), t.dtype)
        for name, t in sorted(control.inputs.items())
    )
    if any(name not in control.rule.shared_inputs for name, _, _ in inputs):
        return None
    return (identity, control.active, inputs)


def merge(controls: Sequence[StepControl | None], sizes: Sequence[int]) -> tuple[StepControl | None, SplitMaps]:
    """The control of one call over the edits' concatenated batches (``sizes``: their row
    counts), and the function that splits the call's gathered word maps back per edit.
    ``controls`` must have one :func:`share_key` (checked)."""
    keys = {share_key(c) for c in controls}
    if len(keys) != 1 or None in keys:
        raise PyinvError("these edits' controls cannot share one UNet call")
    if len(controls) == 1:
        return controls[0], lambda maps: [maps]
    if controls[0] is None:
        return None, lambda maps: [None] * len(controls)
    offsets = [sum(sizes[:e]) for e in range(len(sizes))]
    rule = controls[0].rule
    inputs: dict[str, torch.Tensor] = {}
    for name, how in rule.shared_inputs.items():
        if name not in controls[0].inputs:
            continue
        parts = [c.inputs[name] for c in controls]
        if how == "index":
            inputs[name] = torch.cat([p + o for p, o in zip(parts, offsets, strict=True)])
        elif how == "concat":
            inputs[name] = torch.cat(parts)
        elif how == "stack":
            inputs[name] = torch.stack(parts)
        else:
            raise PyinvError(f"unknown shared input kind {how!r} of {name!r}")
    shared_rule, extra = rule.shared(list(controls), offsets)
    inputs.update(extra)
    merged = StepControl(shared_rule, inputs, controls[0].active)
    return merged, lambda maps: shared_rule.split_maps(maps, list(controls))
