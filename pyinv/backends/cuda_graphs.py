"""A flattened UNet call captured once as a CUDA graph and replayed at every later call.

:class:`GraphedCall` runs ``fn(*tensors) → tuple of tensors`` (a
:class:`~pyinv.backends.flat.FlatUNet`, compiled or not) on static input buffers: at its
first call it copies the inputs in, runs ``fn`` a few times on a side stream (warm-up:
compilation, autotuning, allocator growth happen here, outside any timed region), then
captures one run into a ``torch.cuda.CUDAGraph``. Every call copies its inputs into the
buffers, replays the graph and returns copies of the outputs (the buffers are overwritten by
the next replay). The graphs of one device share a memory pool and replay under one lock, so
concurrent calls never share buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

#: warm-up runs before capture
WARMUP = 3

_POOLS: dict[int, object] = {}
_LOCKS: dict[int, threading.Lock] = {}
_GUARD = threading.Lock()


def _device_state(device: torch.device) -> tuple[object, threading.Lock]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _GUARD:
        if index not in _POOLS:
            _POOLS[index] = torch.cuda.graph_pool_handle()
            _LOCKS[index] = threading.Lock()
        return _POOLS[index], _LOCKS[index]


class GraphedCall:
    """``fn`` on the shapes of ``example`` as a replayed CUDA graph (module docstring)."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], example: Sequence[torch.Tensor]):
        self.fn = fn
        self.device = example[0].device
        self.pool, self.lock = _device_state(self.device)
        self.inputs = [t.detach().clone() for t in example]
        self.outputs: Sequence[torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP):
                self.fn(*self.inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            self.outputs = tuple(self.fn(*self.inputs))
        self.graph = graph

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock:
            for buffer, t in zip(self.inputs, tensors, strict=True):
                buffer.copy_(t)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            return [out.clone() for out in self.outputs]
