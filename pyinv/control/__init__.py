"""Attention controllers for editing. :class:`Controller` is the interface the loop drives."""

from .base import Controller, NoControl

__all__ = ["Controller", "NoControl"]
