"""Attention controllers for editing. A :class:`Controller` plans an edit's control as data
(:class:`ControlPlan`); the processors of :mod:`pyinv.control.attention` apply it.

- :class:`P2P` (with :class:`LocalBlend`): Prompt-to-Prompt replace / refine / reweight.
- :class:`MasaCtrl`: mutual self-attention.
- :class:`PnP`: Plug-and-Play feature and self-attention injection.

:mod:`pyinv.control.registry` names them (``"none"``, ``"p2p"``, ``"masactrl"``, ``"pnp"``)
and builds them, for the command line, the benchmarks and ``Editor.edit(control=...)``.
"""

from .base import Controller, ControlPlan, ControlRule, EditContext, NoControl, StepControl
from .masactrl import MasaCtrl
from .p2p import P2P, LocalBlend
from .pnp import PnP
from .registry import (
    CONTROL_NAMES,
    DEFAULT_CONTROL,
    KINDS,
    ControlKind,
    benchmark_controller,
    build_controller,
    get_control,
)

#: the controller classes by name, as ``Editor.edit(control="p2p")`` accepts them (each with
#: its defaults); the prompt swap ``"none"`` is left out (see :data:`KINDS`)
CONTROLS = {name: kind.cls for name, kind in KINDS.items() if not kind.is_prompt_swap}

__all__ = [
    "CONTROLS",
    "CONTROL_NAMES",
    "DEFAULT_CONTROL",
    "KINDS",
    "P2P",
    "ControlKind",
    "ControlPlan",
    "ControlRule",
    "Controller",
    "EditContext",
    "LocalBlend",
    "MasaCtrl",
    "NoControl",
    "PnP",
    "StepControl",
    "benchmark_controller",
    "build_controller",
    "get_control",
]
