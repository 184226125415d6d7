"""Inversion methods, one module each, and the registry the API and CLI use."""

from __future__ import annotations

from .base import EditOutput, Method
from .ddim import DDIMInversion
from .direct import DirectInversion
from .edict import EDICTInversion
from .edit_friendly import EditFriendlyInversion
from .negative_prompt import NegativePromptInversion
from .null_text import NullTextInversion
from .options import MethodOptions, OptionField, option_fields
from .prompt_tuning import PromptTuningInversion
from .record import Inversion
from .registry import ALIASES, METHODS, get_method, register

register(
    DDIMInversion(),
    NullTextInversion(),
    NegativePromptInversion(),
    PromptTuningInversion(),
    DirectInversion(),
    EditFriendlyInversion(),
    EDICTInversion(),
)

__all__ = [
    "ALIASES",
    "METHODS",
    "EditOutput",
    "Inversion",
    "Method",
    "MethodOptions",
    "OptionField",
    "get_method",
    "option_fields",
]
