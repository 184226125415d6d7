"""The ``compile`` backend: the UNet through ``torch.compile`` with static shapes.

Dynamo traces one graph per batch layout and control signature (the layers a rule controls,
the tensors' shapes), at the first call of each, and replays it at every later step and edit;
the weights are the model's own (nothing is copied).
"""

from __future__ import annotations

import threading

import torch

from .base import Backend

#: compiled graphs dynamo may keep per UNet: each batch layout and control signature is one,
#: and a benchmark matrix holds more than dynamo's default limit, past which it runs eagerly
CACHE_LIMIT = 64

_LOCK = threading.Lock()


class CompileBackend(Backend):
    name = "compile"
    traced = True

    def __init__(self):
        self._compiled: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}  # id → (unet, compiled)

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
