"""The ``compile`` backend: the UNet through ``torch.compile`` with static shapes.

Dynamo traces one graph per batch layout and control signature (the layers a rule controls,
the tensors' shapes), at the first call of each, and replays it at every later step and edit;
the weights are the model's own (nothing is copied). On a CUDA device each call signature
(:class:`~pyinv.backends.flat.GraphSignature`) is moreover captured as a CUDA graph after a
warm-up and replayed (:mod:`pyinv.backends.cuda_graphs`): one launch per UNet call instead
of hundreds of kernel launches from Python.
"""

from __future__ import annotations

import threading

import torch

from .base import Backend
from .cuda_graphs import GraphedCall
from .flat import flat_inputs, flat_unet

#: compiled graphs dynamo may keep per UNet: each batch layout and control signature is one,
#: and a benchmark matrix holds more than dynamo's default limit, past which it runs eagerly
CACHE_LIMIT = 64

_LOCK = threading.RLock()


class CompileBackend(Backend):
    """See the module docstring; ``cuda_graphs=False`` runs the compiled UNet without
    capturing CUDA graphs."""

    name = "compile"
    traced = True

    def __init__(self, cuda_graphs: bool = True):
        self.cuda_graphs = cuda_graphs
        self._compiled: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}  # id → (unet, compiled)
        self._graphed: dict[tuple, tuple[torch.nn.Module, GraphedCall]] = {}

    def runner(self, unet):
        with _LOCK:
            found = self._compiled.get(id(unet))
            if found is None or found[0] is not unet:
                config = torch._dynamo.config
                for name in ("recompile_limit", "cache_size_limit"):
                    if hasattr(config, name):
                        setattr(config, name, max(getattr(config, name), CACHE_LIMIT))
                found = self._compiled[id(unet)] = (unet, torch.compile(unet, dynamic=False))
            return found[1]

    def run(self, model, sample, timestep, embeddings, control):
        if not (self.cuda_graphs and sample.device.type == "cuda"):
            return super().run(model, sample, timestep, embeddings, control)
        signature, tensors = flat_inputs(sample, timestep, embeddings, control)
        key = (id(model.unet), signature, model.added_conditions)  # the time ids are captured constants
        with _LOCK:
            found = self._graphed.get(key)
            if found is None or found[0] is not model.unet:
                found = (
                    model.unet,
                    GraphedCall(flat_unet(self.runner(model.unet), control, model.added_conditions), tensors),
                )
                self._graphed[key] = found
        outs = found[1](tensors)
        return outs[0], (outs[1] if len(outs) > 1 else None)
