"""Seeded random draws that belong to one thread.

``with seeded(seed): …`` gives the block its own CPU generator, seeded with ``seed``; the
draws the algorithms make through :func:`normal` inside it come from that generator, so a
seeded inversion is reproducible whatever other threads draw at the same time (torch's
global generator is shared by every thread). Outside a seeded block :func:`normal` draws from
torch's global generator, as ``torch.randn`` does. A generator seeded with ``s`` gives the
same numbers as the global one after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCAL = threading.local()


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draws of :func:`normal` in this thread come from a generator seeded with ``seed`` for
    the block (``None``: no change)."""
    if seed is None:
        yield
        return
    previous = getattr(_LOCAL, "generator", None)
    _LOCAL.generator = torch.Generator().manual_seed(int(seed))
    try:
        yield
    finally:
        _LOCAL.generator = previous


def normal(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``N(0, I)`` samples of ``shape`` on the CPU, from this thread's seeded generator when
    inside :func:`seeded`, else from torch's global one."""
    return torch.randn(shape, dtype=dtype, generator=getattr(_LOCAL, "generator", None))
