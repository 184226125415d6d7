"""The interface every UNet backend provides."""

from __future__ import annotations

import torch

from ..control.attention import ControlCall, control_scope
from ..sdxl import unet_kwargs


class Backend:
    """Runs a model's UNet: :meth:`run` is "the UNet on this batch at this step with this
    control", ``(sample (R, C, h, w), timestep (), embeddings (R, L, D), control) →
    (prediction (R, C, h, w), maps (1 + T, n) or None)``, with ``control`` a
    :class:`~pyinv.control.base.StepControl` (``None``: a plain call) and ``maps`` the word
    maps LocalBlend sums, gathered by the call's controlled layers.

    Attributes:
        name: the backend's name (:data:`pyinv.backends.BACKENDS`).
        families: the model families it runs (``pyinv info`` lists them).
        traced: the UNet runs as a traced graph, which controllers keep to one per layout by
            applying every term at every step.
    """

    name: str = ""
    traced: bool = False
    #: the model families (``DiffusionModel.family``: ``"SD"``, ``"SDXL"``) it runs
    families: tuple[str, ...] = ("SD", "SDXL")

    def runner(self, unet: torch.nn.Module):
        """The module the UNet runs as (diffusers' UNet signature), made once per UNet."""
        return unet

    @classmethod
    def availability(cls) -> str | None:
        """Why the backend cannot run here (a missing package), or ``None`` when it can."""
        return None

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse (``PyinvError``) a device or dtype the backend cannot run."""

    def check_model(self, model) -> None:
        """Refuse (``PyinvError``) a loaded model the backend cannot run; called once the
        model's added conditions are known (:attr:`~pyinv.models.DiffusionModel.added_conditions`).
        Every built-in backend runs SD and SDXL models alike, so none refuses any."""

    def run(self, model, sample, timestep, embeddings, control) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One UNet call of ``model`` (a :class:`~pyinv.models.DiffusionModel`); the
        tensors are already on the model's device and dtype."""
        return call_module(self.runner(model.unet), sample, timestep, embeddings, control, model.added_conditions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def call_module(unet, sample, timestep, embeddings, control, added=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call a module with diffusers' UNet signature under ``control``: the control goes in
    with the call (``cross_attention_kwargs``, and the thread's :func:`control_scope` for the
    ResNet hooks), so concurrent calls on one UNet do not meet. ``added``: the model's
    :class:`~pyinv.sdxl.AddedConditions` (SDXL's packed embeddings are split back), or ``None``."""
    conditions = unet_kwargs(embeddings, added)
    if control is None:
        return unet(sample, timestep, **conditions, return_dict=False)[0], None
    call = ControlCall(control)
    with control_scope(call):
        kwargs = {"control": call}
        out = unet(sample, timestep, **conditions, cross_attention_kwargs=kwargs, return_dict=False)
    return out[0], call.gathered()
