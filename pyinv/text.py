"""Tokenizer calls that are safe to make from several threads at once.

A fast (Rust-backed) tokenizer keeps its truncation and padding settings in the tokenizer
object and sets them at every call from the call's arguments; two threads calling one
tokenizer with different settings at the same time (an edit's prompt encoding, padded to
the maximum length, and another edit's word lookup, unpadded) can each run with the other's
settings. Every call pyinv makes goes through :func:`tokenize`, which serialises them
(tokenising a prompt takes microseconds).
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.RLock()


def tokenize(tokenizer, text: str | list[str], **kwargs: Any):
    """``tokenizer(text, **kwargs)``, one call at a time across threads."""
    with _LOCK:
        return tokenizer(text, **kwargs)


def vocabulary(tokenizer) -> dict[str, int]:
    """``tokenizer.get_vocab()``, one call at a time across threads."""
    with _LOCK:
        return tokenizer.get_vocab()
