"""Attention controllers for editing. :class:`Controller` is the interface the loop drives.

- :class:`P2P` (with :class:`LocalBlend`): Prompt-to-Prompt replace / refine / reweight.
- :class:`MasaCtrl`: mutual self-attention.
- :class:`PnP`: Plug-and-Play feature and self-attention injection.
"""

from .base import Controller, NoControl
from .masactrl import MasaCtrl
from .p2p import P2P, LocalBlend
from .pnp import PnP

__all__ = ["Controller", "LocalBlend", "MasaCtrl", "NoControl", "P2P", "PnP"]
