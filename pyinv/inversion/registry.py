"""The method registry: registered name → method, and the aliases users may type.

A leaf module: it imports no method. :mod:`pyinv.inversion` registers the methods when
the package is imported, so the record (which looks up the method a file names) and the
option descriptions read the registry without importing the package above them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import PyinvError

if TYPE_CHECKING:
    from .base import Method

#: registered name → method, in the order ``pyinv methods`` lists them
METHODS: dict[str, Method] = {}

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


def register(*methods: Method) -> None:
    """Add ``methods`` under their names (a name registered again is replaced)."""
    for method in methods:
        METHODS[method.name] = method


def get_method(name: str) -> Method:
    """The method registered as ``name`` (or an alias); a clear error otherwise."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in METHODS:
        raise PyinvError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]
