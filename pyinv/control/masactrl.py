"""MasaCtrl: mutual self-attention control (Cao et al., arXiv 2304.08465).

From call ``start_step`` of the edit and self-attention layer ``start_layer`` on (layers
counted over the UNet's self-attention layers in execution order: encoder, middle,
decoder), every target row's self-attention queries the source's keys and values of the
same half (unconditional rows read the source's unconditional pass, conditional rows its
conditional pass):

    out_tgt = SDPA(Q_tgt, K_src, V_src)

Implemented as a row index on K and V, so it runs in the same fused attention call; the
plan stacks the index over the calls (the identity before ``start_step`` where every step
applies it, ``graph_static``).

Steps count the UNet calls of the edit, as the reference does (its ``cur_step`` starts at 0
when the editor is registered and advances once per UNet call, one per sampling step;
control runs at ``step_idx = range(start_step, total_steps)`` with ``total_steps`` the number
of sampling steps, 50 in its runs): calls ``k ≥ start_step`` counted from the first step the
edit runs, to its end. With EF-DDPM's skip (``first_step = 36`` of 100) control starts at
step 36 + ``start_step``.

MasaCtrl keeps the source's appearance by design (the target's queries fetch the source's
keys and values); it is made for non-rigid edits (pose, shape), not for colour changes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..errors import PyinvError
from .attention import AttentionLayer, Rows, attention_layers, sdpa
from .base import Controller, ControlRule, EditContext, StepTable

#: the reference's start layer, counted over SD 1.x's 16 self-attention layers
REFERENCE_START_LAYER, REFERENCE_LAYERS = 10, 16
#: the self-attention layer counts the reference's code knows (its ``MODEL_TYPE``: SD 16,
#: SDXL 70); its SDXL mode keeps the default ``start_layer=10`` (layers 10 … 69)
REFERENCE_LAYER_COUNTS = (16, 70)


class MasaCtrl(Controller):
    """``MasaCtrl(start_step=4, start_layer=None)``.

    Args:
        start_step: first call of the edit that is controlled (reference 4).
        start_layer: first controlled self-attention layer (reference 10 of SD 1.x's 16).
            ``None``: 10 on a model with 16 self-attention layers (SD 1.x/2.x) or 70 (SDXL:
            the reference's SDXL mode counts 70 and keeps 10), else the same fraction of the
            model's layers as 10 of 16 (rounded).
        graph_static: compute the controlled attention every step (see
            :class:`~pyinv.control.base.Controller`).
    """

    reads_source = frozenset({"uncond", "cond"})

    def __init__(self, start_step: int = 4, start_layer: int | None = None, graph_static: bool | None = None):
        for name, value in (("start_step", start_step), ("start_layer", start_layer)):
            if value is None and name == "start_layer":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise PyinvError(f"MasaCtrl {name} must be a non-negative integer, got {value!r}")
        self.start_step = int(start_step)
        self.start_layer = None if start_layer is None else int(start_layer)
        self.graph_static = None if graph_static is None else bool(graph_static)

    def __repr__(self) -> str:
        return f"MasaCtrl(start_step={self.start_step}, start_layer={self.start_layer})"

    def check_prompts(self, model, source_prompt: str, targets: list[str], num_steps: int | None = None) -> None:
        self.controlled_layers(attention_layers(model.unet, (model.latent_size, model.latent_size)))
        if num_steps is not None:
            self._check_calls(num_steps)

    def prepare(self, model, program, source_prompt: str, targets: list[str]):
        self._check_calls(program.schedule.num_steps - program.first_step)
        return program

    def _check_calls(self, calls: int) -> None:
        if self.start_step >= calls:
            raise PyinvError(f"MasaCtrl start_step {self.start_step} leaves nothing to control in a {calls}-step edit")

    def resolved_start_layer(self, num_self_layers: int) -> int:
        """The start layer: as given, else the reference's 10 on the UNets its code knows (SD
        1.x/2.x's 16 self-attention layers and SDXL's 70, where its SDXL mode keeps 10), else
        the same fraction of the model's layers as 10 of 16 (rounded)."""
        if self.start_layer is not None:
            return self.start_layer
        if num_self_layers in REFERENCE_LAYER_COUNTS:
            return REFERENCE_START_LAYER
        return round(REFERENCE_START_LAYER * num_self_layers / REFERENCE_LAYERS)

    def controlled_layers(self, layers: list[AttentionLayer]) -> list[AttentionLayer]:
        own = [x for x in layers if not x.is_cross]
        start = self.resolved_start_layer(len(own))
        if start >= len(own):
            raise PyinvError(
                f"MasaCtrl start_layer {start} is past the model's {len(own)} self-attention layers"
                f" (use a value below {len(own)})"
            )
        return [x for x in own if x.index >= start]

    def plan(self, model, program, layout, context: EditContext) -> StepTable:
        """Per call: the K/V row index ``(R,)`` (targets → the source's pass of their half)."""
        calls = program.schedule.num_steps - program.first_step
        self._check_calls(calls)
        size = tuple(int(s) for s in program.start.shape[-2:])
        chosen = self.controlled_layers(attention_layers(model.unet, size))
        rows = Rows(layout, model.device)
        active = [k >= self.start_step for k in range(calls)]
        static = self.static_for(model)
        routed = active if static else [True] * calls
        kv = rows.per_step_index({"uncond": "uncond", "cond": "cond"}, routed)
        rule = MasaRule(layers=frozenset(x.name for x in chosen))
        steps = [frozenset({"masa"}) if on else frozenset() for on in active]
        return StepTable(rule, program.first_step, {"kv": kv}, {}, steps, frozenset({"masa"}), static)


@dataclass(frozen=True, kw_only=True)
class MasaRule(ControlRule):
    """``out = SDPA(Q, K[kv], V[kv])`` on the controlled self-attention layers."""

    shared_inputs = {"kv": "index"}

    def share_identity(self) -> MasaRule:
        return self  # no row numbers in the rule itself

    def attend(self, name: str, q, k, v, scale: float, call):
        step = call.step
        if "masa" not in step.active:
            return sdpa(q, k, v, scale)
        kv = step.inputs["kv"]
        return sdpa(q, k.index_select(0, kv), v.index_select(0, kv), scale)
