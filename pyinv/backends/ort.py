"""The ``onnxruntime`` backend: the UNet as exported ONNX graphs run by ONNX Runtime.

Each call's :class:`~pyinv.backends.flat.GraphSignature` picks a graph: the plain one for
uncontrolled calls, a controlled one (control tensors as graph inputs) per layout and rule.
A graph is exported at its first call (or ahead of time by ``pyinv export``), checked
against the eager UNet on that call, kept in the export cache and loaded into an
``InferenceSession`` once per process. Providers: CUDA (with I/O binding on the device's
tensors, on PyTorch's current stream) when the model is on a GPU and onnxruntime-gpu is
installed, else the CPU one; float32 and float16 models. SD 1.x/2.x and SDXL models alike:
an SDXL graph splits the packed embeddings ``(R, L + 1, D1 + D2)`` itself and has the model's
time ids built in (part of its cache slot, :func:`~pyinv.backends.export.graph_what`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import PyinvError
from .cache import Entry, ExportCache
from .export import GRAPH_FILE, OPSET, PARITY, ExportingBackend, check_parity, missing_packages, require
from .flat import GraphSignature, flat_inputs, flat_unet

log = logging.getLogger(__name__)

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


class OnnxRuntimeBackend(ExportingBackend):
    """See the module docstring. ``cache``: the export cache (a directory or an
    :class:`~pyinv.backends.cache.ExportCache`; default
    :func:`~pyinv.backends.cache.default_root`); ``optimize``: run the ONNX optimizer on
    exported graphs (ONNX Runtime optimises them itself when it loads them)."""

    name = "onnxruntime"

    def __init__(self, cache: ExportCache | str | None = None, opset: int = OPSET, optimize: bool = False):
        super().__init__(cache, opset, optimize)

    @classmethod
    def availability(cls) -> str | None:
        missing = missing_packages("onnxruntime", "onnx", "onnxscript")
        return f"needs {', '.join(missing)} (pip install 'pyinv[export]')" if missing else None

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

        def make() -> OrtGraph:
            flat = flat_unet(model.unet, control, model.added_conditions)
            entry = self.graph_entry(model, signature, flat, tensors)
            graph = OrtGraph(entry, model.device)
            if entry.built:  # a new graph must give the eager UNet's outputs, or it is not used
                try:
                    with torch.no_grad():
                        want = flat(*tensors)
                    check_parity("exported graph", graph(tensors), want, model.dtype, signature)
                except PyinvError:
                    self.cache.remove(entry)
                    raise
            self.record(signature, entry)
            return graph

        return self.made_for(model, signature, make)
