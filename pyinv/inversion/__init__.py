"""Inversion methods, one module each, and the registry the API and CLI use."""

from __future__ import annotations

from ..errors import PyinvError
from .base import EditOutput, Method
from .ddim import DDIMInversion
from .direct import DirectInversion
from .edict import EDICTInversion
from .edit_friendly import EditFriendlyInversion
from .negative_prompt import NegativePromptInversion
from .null_text import NullTextInversion
from .prompt_tuning import PromptTuningInversion
from .record import Inversion

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        DDIMInversion(),
        NullTextInversion(),
        NegativePromptInversion(),
        PromptTuningInversion(),
        DirectInversion(),
        EditFriendlyInversion(),
        EDICTInversion(),
    )
}

ALIASES = {
    "nti": "null-text",
    "null_text": "null-text",
    "npi": "negative-prompt",
    "negative_prompt": "negative-prompt",
    "pti": "prompt-tuning",
    "prompt_tuning": "prompt-tuning",
    "pnp-inversion": "direct",
    "direct-inversion": "direct",
    "ef-ddpm": "edit-friendly",
    "edit_friendly": "edit-friendly",
    "ddpm": "edit-friendly",
}


def get_method(name: str) -> Method:
    """The method registered as ``name`` (or an alias); a clear error otherwise."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in METHODS:
        raise PyinvError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


__all__ = ["METHODS", "EditOutput", "Inversion", "Method", "get_method"]
