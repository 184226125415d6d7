"""The ``tensorrt`` backend: the UNet as TensorRT engines built from the exported ONNX graphs.

Each call's :class:`~pyinv.backends.flat.GraphSignature` picks an engine, as it picks a graph
for the ``onnxruntime`` backend: the plain one for uncontrolled calls, a controlled one (the
control tensors as engine inputs) per layout and rule. At a signature's first call:

1. its ONNX graph comes from the export cache, exported there if absent as the
   ``onnxruntime`` backend exports its graphs, then optimised (:class:`TensorRTBackend`);
2. its engine comes from the export cache too, built there if absent by
   :meth:`TensorRTBackend.build_engine` from that graph (what TensorRT's parser does not
   import rewritten: :func:`tensorrt_graph`) with one optimisation profile of the signature's
   static shapes (:func:`profile_shapes`). An engine is for one GPU model and one TensorRT
   release (:func:`engine_what`, :func:`engine_key`): one made by another release is stale
   and rebuilt in its slot;
3. a newly built engine is checked against the eager UNet on that call and dropped from the
   cache if it differs (relative error over :data:`~pyinv.backends.ort.PARITY`).

The precision is the model's: a float16 model exports a float16 graph, parsed as a strongly
typed network (the only kind TensorRT 11 builds; TensorRT 10 is asked for it), so the engine
computes in float16 where the graph does. Float32 models build float32 engines, with TF32
off. Engines run on PyTorch's current stream with their inputs and outputs in static device
buffers; after a first (warm-up) execution each engine's execution is captured once as a
CUDA graph, which later calls replay. Needs ``pip install 'pyinv[tensorrt]'`` and a CUDA GPU.

SDXL models export the same way: the graph's ``embeddings`` input is the packed
``(R, L + 1, D1 + D2)`` tensor (split inside the graph, the time ids constants of it), so the
profile is again the signature's static shapes and the engine's slot has the time ids too.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import PyinvError
from .cache import Entry, ExportCache
from .export import (
    GRAPH_FILE,
    OPSET,
    PARITY,
    ExportingBackend,
    check_parity,
    graph_key,
    graph_what,
    missing_packages,
    require,
)
from .flat import GraphSignature, flat_inputs, flat_unet

log = logging.getLogger(__name__)

#: the engine file in a cache entry
ENGINE_FILE = "unet.plan"
#: bumped when the build settings change (part of every engine key)
BUILD_SETTINGS = 1

Shape = tuple[int, ...]

#: ONNX element types of graph outputs, as torch dtypes
_ONNX_DTYPES = {
    "FLOAT": torch.float32,
    "FLOAT16": torch.float16,
    "BFLOAT16": torch.bfloat16,
    "DOUBLE": torch.float64,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "BOOL": torch.bool,
}
#: TensorRT data types by their name in the ``tensorrt`` module, which torch names alike
_TRT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


# ---------------------------------------------------------------------- what an engine is for
def profile_shapes(signature: GraphSignature) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimisation profile of ``signature``'s engine: ``input name → (min, opt, max)``
    shapes, all three the input's shape (a graph has static shapes; one engine per layout)."""
    return {spec.name: (spec.shape, spec.shape, spec.shape) for spec in signature.inputs}


def gpu_identity(device: torch.device) -> dict[str, str]:
    """The GPU an engine is built for: ``{"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}``."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}


def tensorrt_version() -> str:
    """The installed TensorRT's version (``"10.9.0.34"``)."""
    return str(require("tensorrt", extra="tensorrt").__version__)


def engine_what(model, signature: GraphSignature, gpu: Mapping[str, str]) -> dict[str, Any]:
    """What an engine is for (its cache slot): the graph's model, signature and dtype, and the GPU."""
    return {**graph_what(model, signature, kind="tensorrt-engine"), "gpu": dict(gpu)}


def engine_key(opset: int, optimize: bool, trt_version: str) -> dict[str, Any]:
    """What an engine is made with (its cache key): the graph's exporter settings and
    versions, the TensorRT version and the build settings."""
    return {**graph_key(opset, optimize), "tensorrt": trt_version, "build_settings": BUILD_SETTINGS}


def graph_outputs(path: Path) -> dict[str, torch.dtype]:
    """The ONNX graph's outputs in order, ``name → dtype`` (read without its weights)."""
    onnx = require("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {}
    for value in graph.output:
        kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        if kind not in _ONNX_DTYPES:
            raise PyinvError(f"the graph's output {value.name!r} has an unsupported type {kind}")
        outputs[value.name] = _ONNX_DTYPES[kind]
    return outputs


def tensorrt_graph(model) -> int:
    """Rewrite, in place, what TensorRT's ONNX parser does not import in an exported graph (an
    ``onnx.ModelProto``); returns how many nodes were rewritten.

    ``ScatterND`` with ``reduction="add"`` (P2P's ``index_add`` of the source's attention
    onto the target rows) becomes ``ScatterND(data, indices, GatherND(data, indices) +
    updates)``: the same result when the indices are distinct, as P2P's target rows are."""
    onnx = require("onnx")
    nodes = []
    rewritten = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "ScatterND" or attrs.get("reduction", b"none") != b"add":
            nodes.append(node)
            continue
        data, indices, updates = node.input
        (out,) = node.output
        gathered, summed = f"{out}__gathered", f"{out}__summed"
        nodes += [
            onnx.helper.make_node("GatherND", [data, indices], [gathered], name=f"{out}__gather"),
            onnx.helper.make_node("Add", [gathered, updates], [summed], name=f"{out}__add"),
            onnx.helper.make_node("ScatterND", [data, indices, summed], [out], name=node.name or f"{out}__scatter"),
        ]
        rewritten += 1
    if rewritten:
        kept = []
        for node in nodes:  # copies: the originals belong to the list about to be emptied
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            kept.append(copy)
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return rewritten


# ---------------------------------------------------------------------- TensorRT's own objects
_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def trt_logger(trt):
    """The process's TensorRT logger: TensorRT's messages go to this module's Python logger
    (errors at ERROR, the rest at DEBUG), and the last errors are kept for our messages."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            severity = trt.ILogger.Severity
            errors = (severity.INTERNAL_ERROR, severity.ERROR)

            class Logger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.errors: collections.deque[str] = collections.deque(maxlen=6)

                def log(self, level, msg):
                    if level in errors:
                        self.errors.append(str(msg))
                        log.error("TensorRT: %s", msg)
                    else:
                        log.debug("TensorRT: %s", msg)

            _LOGGER = Logger()
        return _LOGGER


def _last_errors(trt) -> str:
    """`` (TensorRT: …; …)`` with the logger's last errors, which it then forgets; or ``""``."""
    errors = trt_logger(trt).errors
    text = "; ".join(errors)
    errors.clear()
    return f" (TensorRT: {text})" if text else ""


def network_flags(trt) -> tuple[int, bool]:
    """``(create_network flags, strongly typed)``: TensorRT 11 builds strongly typed networks
    only (its flag is deprecated and ignored); TensorRT 10 is asked for one; a release without
    the flag builds a weakly typed network."""
    major = int(str(trt.__version__).split(".")[0])
    if major >= 11:
        return 0, True
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        return 0, False
    return 1 << int(flag), True


def torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``."""
    for name in _TRT_DTYPE_NAMES:
        if getattr(trt, name, None) == dtype:
            return getattr(torch, name)
    raise PyinvError(f"the engine has a tensor of type {dtype}, which pyinv cannot bind")


class TrtEngine:
    """One deserialized engine: its execution context, a static device buffer per input and
    output (bound once), and the CUDA graph of one execution (captured at the first call,
    replayed by later ones). ``outputs``: the graph's outputs in order, ``name → dtype`` (an
    output TensorRT computes in another type is cast back). Calls are serialised per engine."""

    def __init__(self, plan: bytes, device: torch.device, outputs: Mapping[str, torch.dtype]):
        trt = require("tensorrt", extra="tensorrt")
        self.device = device
        self.output_dtypes = dict(outputs)
        self._trt = trt
        self._runtime = trt.Runtime(trt_logger(trt))
        with torch.cuda.device(device):
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise PyinvError(f"TensorRT could not load the engine{_last_errors(trt)}")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise PyinvError(f"TensorRT could not create an execution context{_last_errors(trt)}")
            self.inputs: dict[str, torch.Tensor] = {}
            self.outputs: dict[str, torch.Tensor] = {}
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                shape = tuple(int(s) for s in self._engine.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise PyinvError(f"the engine's tensor {name!r} has a dynamic shape {shape}")
                buffer = torch.empty(shape, dtype=torch_dtype(trt, self._engine.get_tensor_dtype(name)), device=device)
                if not self._context.set_tensor_address(name, buffer.data_ptr()):
                    raise PyinvError(f"TensorRT could not bind {name!r}{_last_errors(trt)}")
                is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                (self.inputs if is_input else self.outputs)[name] = buffer
        missing = [name for name in self.output_dtypes if name not in self.outputs]
        if missing:
            raise PyinvError(f"the engine lacks the graph's outputs {missing}")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._capture_tried = False
        self._lock = threading.Lock()
        #: recorded after each call's last use of the buffers, on its stream
        self._released: torch.cuda.Event | None = None

    def __call__(self, named: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The engine on ``named`` inputs (device tensors of the signature's shapes; each is
        copied into its buffer, cast to the engine's type): new output tensors in graph order.
        Runs on the current stream, after the previous call's work on the buffers (whatever
        its stream)."""
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if self._released is not None:
                stream.wait_event(self._released)
            for name, buffer in self.inputs.items():
                tensor = named.get(name)
                if tensor is None:
                    raise PyinvError(f"the engine's input {name!r} was not given")
                if tuple(tensor.shape) != tuple(buffer.shape):
                    raise PyinvError(f"the engine's input {name!r} is {tuple(buffer.shape)}, not {tuple(tensor.shape)}")
                buffer.copy_(tensor)
            if self._graph is not None:
                self._graph.replay()
            else:
                self._execute()
            outs = [self.outputs[name].to(dtype, copy=True) for name, dtype in self.output_dtypes.items()]
            if not self._capture_tried:
                self._capture()
            self._released = stream.record_event()
            return outs

    def _execute(self) -> None:
        """One execution on PyTorch's current stream, on the bound buffers."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self._context.execute_async_v3(stream):
            raise PyinvError(f"TensorRT could not run the engine{_last_errors(self._trt)}")

    def _capture(self) -> None:
        """Capture one execution as a CUDA graph (after the warm-up one); where capture fails
        the engine keeps running without."""
        self._capture_tried = True
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._execute()
        except Exception as exc:  # CUDA and TensorRT report capture problems in many ways
            log.warning("the TensorRT engine runs without a CUDA graph: capturing one failed (%s)", exc)
            return
        self._graph = graph


# ---------------------------------------------------------------------- the backend
def on_device(device: torch.device):
    """The block runs with ``device`` as the current CUDA device (nothing for a CPU device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def named_inputs(signature: GraphSignature, tensors) -> dict[str, torch.Tensor]:
    """The call's tensors by input name."""
    return {spec.name: t for spec, t in zip(signature.inputs, tensors, strict=True)}


class TensorRTBackend(ExportingBackend):
    """See the module docstring. ``cache``: the export cache (a directory or an
    :class:`ExportCache`; default :func:`~pyinv.backends.cache.default_root`). ``optimize``:
    run the exported graphs through the ONNX optimizer, as TensorRT needs: the plain export
    keeps ``torch.split`` as ``SplitToSequence``/``SequenceAt`` (diffusers' GEGLU chunks its
    projection), which TensorRT's ONNX parser does not import; the optimizer folds them into
    ``Split``."""

    name = "tensorrt"

    def __init__(self, cache: ExportCache | str | None = None, opset: int = OPSET, optimize: bool = True):
        super().__init__(cache, opset, optimize)

    @classmethod
    def availability(cls) -> str | None:
        missing = missing_packages("tensorrt", "onnx", "onnxscript")
        if missing:
            return f"needs {', '.join(missing)} (pip install 'pyinv[tensorrt]') and a CUDA GPU"
        return None if torch.cuda.is_available() else "needs a CUDA GPU"

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        if dtype not in PARITY:
            raise PyinvError(f"the tensorrt backend runs float16 or float32 models, not {str(dtype)[6:]}")
        if device.type != "cuda":
            raise PyinvError(f"the tensorrt backend needs a CUDA GPU (device cuda or cuda:N), not {device.type}")
        require("tensorrt", extra="tensorrt")

    def run(self, model, sample, timestep, embeddings, control):
        signature, tensors = flat_inputs(sample, timestep, embeddings, control)
        engine = self.engine(model, signature, control, tensors)
        outs = engine(named_inputs(signature, tensors))
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def engine(self, model, signature: GraphSignature, control, tensors) -> TrtEngine:
        """The engine for ``signature`` (exported, built and checked at its first call)."""

        def make() -> TrtEngine:
            flat = flat_unet(model.unet, control, model.added_conditions)
            graph = self.graph_entry(model, signature, flat, tensors)
            entry, engine = self._loaded_engine(model, signature, graph)
            if entry.built:  # a new engine must give the eager UNet's outputs, or it is not used
                try:
                    with torch.no_grad():
                        want = flat(*tensors)
                    got = engine(named_inputs(signature, tensors))
                    check_parity("TensorRT engine", got, want, model.dtype, signature)
                except PyinvError:
                    self.cache.remove(entry)
                    if graph.built:  # never checked otherwise: it may be the graph that is wrong
                        self.cache.remove(graph)
                    raise
            self.record(signature, entry)
            return engine

        return self.made_for(model, signature, make)

    def _loaded_engine(self, model, signature: GraphSignature, graph: Entry) -> tuple[Entry, TrtEngine]:
        """The engine entry and the engine loaded from it; a cached engine this process
        cannot load (another driver, say) is dropped and rebuilt once."""
        entry = self.engine_entry(model, signature, graph)
        try:
            return entry, self.load_engine(entry, graph, model.device)
        except PyinvError as exc:
            self.cache.remove(entry)
            if entry.built:
                raise
            log.warning("not using the cached TensorRT engine %s: %s; it will be rebuilt", entry.path, exc)
        entry = self.engine_entry(model, signature, graph)
        try:
            return entry, self.load_engine(entry, graph, model.device)
        except PyinvError:
            self.cache.remove(entry)
            raise

    def engine_entry(self, model, signature: GraphSignature, graph: Entry) -> Entry:
        """The engine of ``signature`` for the model's GPU and this TensorRT from the export
        cache, built from ``graph`` by :meth:`build_engine` if absent, stale or corrupt."""
        profile = profile_shapes(signature)

        def build(directory: Path) -> None:
            with on_device(model.device):  # TensorRT builds for the current GPU
                self.build_engine(graph.file(GRAPH_FILE), profile, directory / ENGINE_FILE)

        return self.cache.get_or_build(
            engine_what(model, signature, gpu_identity(model.device)),
            engine_key(self.opset, self.optimize, tensorrt_version()),
            build,
        )

    def load_engine(self, entry: Entry, graph: Entry, device: torch.device) -> TrtEngine:
        """The engine of a cache entry, deserialized onto ``device``."""
        return TrtEngine(entry.file(ENGINE_FILE).read_bytes(), device, graph_outputs(graph.file(GRAPH_FILE)))

    def build_engine(self, onnx_path: Path, profile: Mapping[str, tuple[Shape, Shape, Shape]], out_path: Path) -> None:
        """Parse the ONNX graph at ``onnx_path`` (its weights beside it; rewritten by
        :func:`tensorrt_graph`), build an engine with one optimisation profile (``input name →
        (min, opt, max)``, :func:`profile_shapes`) on the current GPU and write it to ``out_path``."""
        trt = require("tensorrt", extra="tensorrt")
        onnx = require("onnx")
        logger = trt_logger(trt)
        graph = onnx.load(str(onnx_path), load_external_data=False)
        tensorrt_graph(graph)
        builder = trt.Builder(logger)
        flags, strongly_typed = network_flags(trt)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # the rewritten graph, its weights read from beside the file it came from
        if not parser.parse(graph.SerializeToString(), str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise PyinvError(f"TensorRT could not parse {onnx_path}: {errors or _last_errors(trt)}")
        config = builder.create_builder_config()
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # float32 graphs compute in float32
        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        if not strongly_typed and hasattr(trt.BuilderFlag, "FP16"):
            if any(t.dtype == trt.float16 for t in inputs.values()):
                config.set_flag(trt.BuilderFlag.FP16)
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            if name in inputs:  # an input the graph does not use may be gone from the network
                optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise PyinvError(f"TensorRT could not build an engine from {onnx_path}{_last_errors(trt)}")
        with open(out_path, "wb") as f:
            f.write(plan)
