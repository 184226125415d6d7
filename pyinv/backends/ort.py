"""The ``onnxruntime`` backend: the UNet as exported ONNX graphs run by ONNX Runtime.

Each call's :class:`~pyinv.backends.flat.GraphSignature` picks a graph: the plain one for
uncontrolled calls, a controlled one (control tensors as graph inputs) per layout and rule.
A graph is exported at its first call (or ahead of time by ``pyinv export``), checked
against the eager UNet on that call, kept in the export cache and loaded into an
``InferenceSession`` once per process. Providers: CUDA (with I/O binding on the device's
tensors, on PyTorch's current stream) when the model is on a GPU and onnxruntime-gpu is
installed, else the CPU one; float32 and float16 models.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from ..errors import PyinvError
from .base import Backend
from .cache import Entry, ExportCache
from .export import GRAPH_FILE, OPSET, export_graph, graph_key, graph_what, require
from .flat import FlatUNet, GraphSignature, flat_inputs, flat_unet

log = logging.getLogger(__name__)

#: relative error an exported graph may have against the eager UNet on its first call
PARITY = {torch.float32: 1e-3, torch.float16: 2e-2}

_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}
_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
}


class OrtGraph:
    """One exported graph in an ONNX Runtime session."""

    def __init__(self, entry: Entry, device: torch.device, threads: int | None = None):
        ort = require("onnxruntime")
        self.entry = entry
        self.device = device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PyinvError("the onnxruntime backend on a GPU needs onnxruntime-gpu (pip install onnxruntime-gpu)")
            index = device.index if device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(index).cuda_stream
            cuda = {"device_id": index, "user_compute_stream": str(stream)}
            providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(entry.file(GRAPH_FILE)), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own error types
            raise PyinvError(f"ONNX Runtime could not load {entry.file(GRAPH_FILE)}: {exc}") from exc
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, _TORCH.get(o.type), tuple(o.shape)) for o in self.session.get_outputs()]

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != len(self.inputs):
            raise PyinvError(f"the graph takes {len(self.inputs)} inputs, not {len(tensors)}")
        if self.device.type == "cuda":
            return self._bound(tensors)
        feed = {name: t.detach().contiguous().cpu().numpy() for name, t in zip(self.inputs, tensors, strict=True)}
        return [torch.from_numpy(np.asarray(a)) for a in self.session.run(None, feed)]

    def _bound(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The call on device memory: inputs and outputs bound to PyTorch tensors."""
        binding = self.session.io_binding()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        kept = []
        for name, t in zip(self.inputs, tensors, strict=True):
            t = t.detach().contiguous()
            kept.append(t)
            binding.bind_input(name, "cuda", index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        outs = []
        for name, dtype, shape in self.outputs:
            out = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, "cuda", index, _NUMPY[dtype], shape, out.data_ptr())
            outs.append(out)
        self.session.run_with_iobinding(binding)
        return outs


class OnnxRuntimeBackend(Backend):
    """See the module docstring. ``cache``: the export cache (a directory or an
    :class:`ExportCache`; default :func:`~pyinv.backends.cache.default_root`)."""

    name = "onnxruntime"
    traced = True

    def __init__(self, cache: ExportCache | str | None = None, opset: int = OPSET, optimize: bool = False):
        self.cache = cache if isinstance(cache, ExportCache) else ExportCache(cache)
        self.opset = opset
        self.optimize = optimize
        self._graphs: dict[tuple, tuple[torch.nn.Module, OrtGraph]] = {}
        self._lock = threading.Lock()
        #: what this process exported (signature, entry), in order, for ``pyinv export``'s summary
        self.built: list[tuple[GraphSignature, Entry]] = []
        #: the graphs it found already exported in the cache (signature, entry), in order
        self.found: list[tuple[GraphSignature, Entry]] = []

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend(cache={self.cache!r})"

    @classmethod
    def availability(cls) -> str | None:
        import importlib.util

        missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {', '.join(missing)} (pip install 'pyinv[export]')"
        return None

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        require("onnxruntime")
        if dtype not in PARITY:
            raise PyinvError(f"the onnxruntime backend runs float32 or float16 models, not {str(dtype)[6:]}")
        if dtype == torch.float16 and device.type == "cpu":
            # ONNX Runtime's CPU provider has no float16 ScatterND with reduction (P2P's index_add)
            raise PyinvError("the onnxruntime backend runs float16 only on a GPU; use float32 on the CPU")

    def run(self, model, sample, timestep, embeddings, control):
        signature, tensors = flat_inputs(sample, timestep, embeddings, control)
        graph = self.graph(model, signature, control, tensors)
        outs = graph(tensors)
        prediction = outs[0].to(sample.device)
        maps = outs[1].to(sample.device) if len(outs) > 1 else None
        return prediction, maps

    def graph(self, model, signature: GraphSignature, control, tensors) -> OrtGraph:
        """The session for ``signature`` (exported and checked at its first call)."""
        key = (id(model.unet), signature, str(model.device))
        found = self._graphs.get(key)
        if found is not None and found[0] is model.unet:
            return found[1]
        with self._lock:
            found = self._graphs.get(key)
            if found is not None and found[0] is model.unet:
                return found[1]
            flat = flat_unet(model.unet, control)
            entry = self.cache.get_or_build(
                graph_what(model, signature, optimize=self.optimize),
                graph_key(self.opset, self.optimize),
                lambda directory: export_graph(flat, tensors, signature, directory, self.opset, self.optimize),
            )
            graph = OrtGraph(entry, model.device)
            if entry.built:
                try:
                    self._check_parity(graph, flat, tensors, model.dtype, signature)
                except PyinvError:
                    self.cache.remove(entry)
                    raise
                self.built.append((signature, entry))
            else:
                self.found.append((signature, entry))
            self._graphs[key] = (model.unet, graph)
            return graph

    @staticmethod
    def _check_parity(graph: OrtGraph, flat: FlatUNet, tensors, dtype, signature: GraphSignature) -> None:
        """A newly exported graph must give the eager UNet's outputs on the call it was
        exported at (within :data:`PARITY`), or it is not used."""
        with torch.no_grad():
            want = flat(*tensors)
        got = graph(tensors)
        for name, w, g in zip(("prediction", "maps"), want, got, strict=False):
            w, g = w.float(), g.to(w.device).float()
            err = float((g - w).norm() / w.norm().clamp_min(1e-12))
            if not err <= PARITY[dtype]:
                raise PyinvError(
                    f"the exported graph ({signature.describe()}) differs from the eager UNet: "
                    f"relative error of its {name} {err:.2e} > {PARITY[dtype]:.0e}"
                )
