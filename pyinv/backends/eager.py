"""The eager backend: the UNet as loaded, the reference every other backend is checked against."""

from __future__ import annotations

from .base import Backend


class EagerBackend(Backend):
    name = "eager"
