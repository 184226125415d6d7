"""The interface every UNet backend provides."""

from __future__ import annotations

import torch


class Backend:
    """Runs a model's UNet: :meth:`runner` gives the callable with diffusers' UNet signature
    ``(sample (R, C, h, w), timestep (0-d), encoder_hidden_states=(R, L, D),
    cross_attention_kwargs=…, return_dict=False) → (prediction (R, C, h, w),)``.

    Attributes:
        name: the backend's name (:data:`pyinv.backends.BACKENDS`).
        traced: the UNet runs as a traced graph, which controllers keep to one per layout by
            applying every term at every step.
    """

    name: str = ""
    traced: bool = False

    def runner(self, unet: torch.nn.Module):
        """The callable that runs ``unet`` on this backend (made once per UNet and kept)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
