"""Attention controllers for editing. A :class:`Controller` plans an edit's control as data
(:class:`ControlPlan`); the processors of :mod:`pyinv.control.attention` apply it.

- :class:`P2P` (with :class:`LocalBlend`): Prompt-to-Prompt replace / refine / reweight.
- :class:`MasaCtrl`: mutual self-attention.
- :class:`PnP`: Plug-and-Play feature and self-attention injection.
"""

from .base import Controller, ControlPlan, ControlRule, EditContext, NoControl, StepControl
from .masactrl import MasaCtrl
from .p2p import P2P, LocalBlend
from .pnp import PnP

#: the controllers by name, as ``Editor.edit(control="p2p")`` accepts them (each with its defaults)
CONTROLS = {"p2p": P2P, "masactrl": MasaCtrl, "pnp": PnP}

__all__ = [
    "CONTROLS",
    "ControlPlan",
    "ControlRule",
    "Controller",
    "EditContext",
    "LocalBlend",
    "MasaCtrl",
    "NoControl",
    "P2P",
    "PnP",
    "StepControl",
]
