"""Dispatch of the per-step ops to their implementations.

Only the plain-PyTorch references exist so far; accelerated implementations (Triton,
C++/CUDA) register here and are chosen once per device.
"""

from __future__ import annotations

from .kernels.guided_step import guided_step_reference

#: op name → {implementation name: callable}
IMPLEMENTATIONS = {"guided_step": {"reference": guided_step_reference}}


def guided_step(*args, **kwargs):
    """The fused guided step (see :mod:`pyinv.kernels.guided_step`), active implementation."""
    return guided_step_reference(*args, **kwargs)
