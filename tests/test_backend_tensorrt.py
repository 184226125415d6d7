"""The tensorrt backend: its optimisation profiles, its engine cache (slots per GPU, keys per
TensorRT version, stale and corrupt engines rebuilt: with a stand-in builder), the check of a
new engine against eager (with a stand-in engine), the ONNX graphs TensorRT parses (exported
from the tiny model in fp16), its refusals; and, where TensorRT and a CUDA GPU are present,
real fp16 engines against eager."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys

import pytest
import torch
from unet_calls import SRC, captured_calls

import pyinv
from pyinv import P2P
from pyinv.backends import BACKENDS, EagerBackend, TensorRTBackend, get_backend
from pyinv.backends import trt as trt_backend
from pyinv.backends.cache import Entry, ExportCache
from pyinv.backends.export import GRAPH_FILE, OPSET, graph_what
from pyinv.backends.flat import GraphSignature, TensorSpec, flat_inputs, flat_unet
from pyinv.errors import PyinvError

HAS_TRT_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()

#: the ONNX operators TensorRT's ONNX parser imports: the "Y" rows of onnx-tensorrt's
#: docs/operators.md (TensorRT 10), which reads opsets 9 to 20
TRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
    Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor
    """.split()
)
TRT_OPSETS = range(9, 21)
#: graph input types the parser takes (DOUBLE becomes a FLOAT engine input)
TRT_INPUT_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8", "DOUBLE"}
#: inputs the parser needs as constants (initializers or Constant nodes): ``op → input index``
CONSTANT_INPUTS = {"Slice": 3, "ReduceSum": 1, "Unsqueeze": 1, "Squeeze": 1, "TopK": 1, "CumSum": 1}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}

GPU = {"name": "NVIDIA Test GPU", "capability": "9.0"}
EXPORTED = ("plain", "p2p-refine-reweight-blend")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def fp16_editor() -> pyinv.Editor:
    """The tiny model in fp16, the engines' intended precision (eager, on the CPU here)."""
    return pyinv.Editor.from_pretrained("tiny", dtype="fp16", device="cpu")


@pytest.fixture(scope="module")
def calls(fp16_editor, image):
    return captured_calls(fp16_editor, image, ["p2p-refine-reweight-blend", "masactrl"])


@pytest.fixture(scope="module")
def signatures(calls) -> dict[str, GraphSignature]:
    return {label: flat_inputs(*call)[0] for label, call in calls.items()}


@pytest.fixture(scope="module")
def exported(fp16_editor, calls):
    """The ONNX graph entries TensorRT would parse, for the plain and a P2P call (exported
    once into the session's cache, by the backend itself)."""
    pytest.importorskip("onnxscript", reason="exporting needs pyinv[export]")
    backend = TensorRTBackend()
    entries = {}
    for label in EXPORTED:
        signature, tensors = flat_inputs(*calls[label])
        flat = flat_unet(fp16_editor.model.unet, calls[label][3])
        entries[label] = (signature, tensors, backend.graph_entry(fp16_editor.model, signature, flat, tensors))
    return entries


@pytest.fixture
def fake_trt(monkeypatch):
    """No TensorRT and no GPU needed: the GPU and the TensorRT version are stand-ins."""
    version = {"tensorrt": "10.9.0.34"}
    monkeypatch.setattr(trt_backend, "gpu_identity", lambda device: dict(GPU))
    monkeypatch.setattr(trt_backend, "tensorrt_version", lambda: version["tensorrt"])
    return version


class FakeBuilder:
    """Stands in for ``TensorRTBackend.build_engine``: writes made-up engine bytes and
    records what it was asked to build from."""

    def __init__(self):
        self.builds: list[tuple] = []

    def __call__(self, onnx_path, profile, out_path):
        self.builds.append((onnx_path, profile))
        out_path.write_bytes(b"engine %d" % len(self.builds))


# ---------------------------------------------------------------------- profiles
def test_profiles_are_the_signatures_static_shapes(signatures):
    assert set(signatures) == {"plain", "p2p-refine-reweight-blend", "masactrl"}
    for signature in signatures.values():
        profile = trt_backend.profile_shapes(signature)
        assert list(profile) == [spec.name for spec in signature.inputs]
        for spec in signature.inputs:
            assert profile[spec.name] == (spec.shape, spec.shape, spec.shape)
    plain = trt_backend.profile_shapes(signatures["plain"])
    assert list(plain) == ["sample", "timestep", "embeddings"]
    assert plain["timestep"] == ((), (), ())  # a 0-d input
    assert plain["sample"][0] == (1, 4, 16, 16)
    p2p = trt_backend.profile_shapes(signatures["p2p-refine-reweight-blend"])
    assert p2p["sample"][0] == (3, 4, 16, 16) and p2p["embeddings"][0] == (3, 77, 32)
    assert {"blend_source", "key_scale", "mix", "self_qk"} <= set(p2p)
    built = GraphSignature((TensorSpec("sample", (2, 4, 64, 64), "float16"), TensorSpec("kv", (2,), "int64")), "{}")
    assert trt_backend.profile_shapes(built) == {
        "sample": ((2, 4, 64, 64),) * 3,
        "kv": ((2,),) * 3,
    }


# ---------------------------------------------------------------------- the engine cache
def test_engine_slots_and_keys(fp16_editor, signatures):
    model, signature = fp16_editor.model, signatures["plain"]
    what = trt_backend.engine_what(model, signature, GPU)
    assert what["kind"] == "tensorrt-engine" and what["gpu"] == GPU and what["dtype"] == "float16"
    assert what["graph"] == signature.doc()
    slot = ExportCache.slot_of
    assert slot(what) != slot(graph_what(model, signature))  # not the ONNX graph's slot
    other_gpu = trt_backend.engine_what(model, signature, {**GPU, "name": "NVIDIA Other GPU"})
    other_arch = trt_backend.engine_what(model, signature, {**GPU, "capability": "8.6"})
    other_layout = trt_backend.engine_what(model, signatures["masactrl"], GPU)
    assert len({slot(what), slot(other_gpu), slot(other_arch), slot(other_layout)}) == 4
    key = trt_backend.engine_key(OPSET, True, "10.9.0.34")
    assert key["tensorrt"] == "10.9.0.34" and key["opset"] == OPSET and key["optimize"]
    assert key["versions"]["torch"] == torch.__version__
    assert key != trt_backend.engine_key(OPSET, True, "11.4.0.106")
    # the optimised graphs TensorRT parses have their own slot; the onnxruntime backend's
    # plain exports keep theirs, so neither replaces the other's entries
    assert TensorRTBackend().optimize
    assert "optimize" not in graph_what(model, signature)
    assert slot(graph_what(model, signature, optimize=True)) != slot(graph_what(model, signature))


def test_engines_are_cached_per_gpu_and_rebuilt_when_stale_or_corrupt(fp16_editor, exported, fake_trt, tmp_path):
    model = fp16_editor.model
    signature, _, graph = exported["plain"]
    backend = TensorRTBackend(ExportCache(tmp_path))
    builder = backend.build_engine = FakeBuilder()

    first = backend.engine_entry(model, signature, graph)
    assert first.built and first.file(trt_backend.ENGINE_FILE).read_bytes() == b"engine 1"
    onnx_path, profile = builder.builds[0]
    assert onnx_path == graph.file(GRAPH_FILE) and profile == trt_backend.profile_shapes(signature)

    again = backend.engine_entry(model, signature, graph)
    assert not again.built and again.path == first.path and len(builder.builds) == 1

    fake_trt["tensorrt"] = "11.4.0.106"  # another TensorRT: stale, rebuilt in the same slot
    newer = backend.engine_entry(model, signature, graph)
    assert newer.built and newer.path == first.path and len(builder.builds) == 2
    assert not backend.engine_entry(model, signature, graph).built

    plan = newer.file(trt_backend.ENGINE_FILE)
    plan.write_bytes(b"engine X")  # same size, other bytes: corrupt, rebuilt
    fixed = backend.engine_entry(model, signature, graph)
    assert fixed.built and fixed.path == first.path and plan.read_bytes() == b"engine 3"

    with pytest.MonkeyPatch.context() as mp:  # another GPU: its own slot, the first one kept
        mp.setattr(trt_backend, "gpu_identity", lambda device: {**GPU, "name": "NVIDIA Other GPU"})
        other = backend.engine_entry(model, signature, graph)
    assert other.built and other.path != first.path and len(builder.builds) == 4
    assert not backend.engine_entry(model, signature, graph).built

    def failing(onnx_path, profile, out_path):
        out_path.write_bytes(b"half an engine")
        raise PyinvError("TensorRT could not build an engine")

    backend.build_engine = failing
    fake_trt["tensorrt"] = "12.0"
    with pytest.raises(PyinvError, match="could not build"):
        backend.engine_entry(model, signature, graph)
    # the failed build left nothing: no partial directory, and the old entry is not used
    assert not any(p.name.startswith(".partial-") for p in tmp_path.iterdir())
    assert (
        backend.cache.lookup(
            trt_backend.engine_what(model, signature, GPU), trt_backend.engine_key(OPSET, True, "12.0")
        )
        is None
    )


class FakeEngine:
    """Stands in for a loaded engine: the eager UNet's outputs, ``offset`` added."""

    def __init__(self, flat, signature, offset=0.0):
        self.flat, self.signature, self.offset = flat, signature, offset

    def __call__(self, named):
        with torch.no_grad():
            outs = self.flat(*(named[spec.name] for spec in self.signature.inputs))
        return [out + self.offset for out in outs]


def test_a_new_engine_is_checked_against_eager(fp16_editor, calls, exported, fake_trt, tmp_path):
    """The backend's run with stand-in engines: a new one that differs from eager is refused
    and dropped; a cached one is used unchecked; one that does not load is rebuilt once."""
    model = fp16_editor.model
    sample, t, emb, control = calls["plain"]
    signature, _, graph = exported["plain"]
    flat = flat_unet(model.unet, None)
    cache = ExportCache(tmp_path / "cache")
    graph = dataclasses.replace(graph, built=False)  # the module's exported graph, as found in a cache

    def backend_with(offset, onnx=graph):
        backend = TensorRTBackend(cache)
        backend.graph_entry = lambda *args: onnx
        backend.build_engine = FakeBuilder()
        backend.load_engine = lambda entry, graph, device: FakeEngine(flat, signature, offset)
        return backend

    wrong = backend_with(offset=1.0)
    with pytest.raises(PyinvError, match="differs from the eager UNet"):
        wrong.run(model, sample, t, emb, None)
    assert cache.entries() == []  # the new engine was dropped (the graph, cached before, kept)
    assert graph.file(GRAPH_FILE).exists()

    right = backend_with(offset=0.0)
    want, _ = EagerBackend().run(model, sample, t, emb, None)
    got, maps = right.run(model, sample, t, emb, None)
    assert maps is None and torch.equal(got, want)
    assert [s for s, _ in right.built] == [signature] and len(cache.entries()) == 1
    right.run(model, sample, t, emb, None)  # the same engine, not rebuilt or rechecked
    assert len(right.build_engine.builds) == 1 and len(right.built) == 1

    later = backend_with(offset=1.0)  # another process: the cached engine is used unchecked
    later.run(model, sample, t, emb, None)
    assert later.built == [] and later.build_engine.builds == []

    unloadable = backend_with(offset=0.0)  # a cached engine that does not load is rebuilt once
    loads = []

    def load_once_failing(entry, graph, device):
        loads.append(entry.built)
        if len(loads) == 1:
            raise PyinvError("TensorRT could not load the engine")
        return FakeEngine(flat, signature)

    unloadable.load_engine = load_once_failing
    unloadable.run(model, sample, t, emb, None)
    assert loads == [False, True] and len(unloadable.build_engine.builds) == 1

    # an engine that differs from eager, built from a graph exported on the same call: both
    # are dropped (the graph was never checked either)
    copy = tmp_path / "graph"
    shutil.copytree(graph.path, copy)
    fresh = backend_with(offset=1.0, onnx=Entry(copy, built=True))
    fresh.cache = ExportCache(tmp_path / "other")
    with pytest.raises(PyinvError, match="differs from the eager UNet"):
        fresh.run(model, sample, t, emb, None)
    assert not copy.exists() and fresh.cache.entries() == []


# ---------------------------------------------------------------------- the graphs TensorRT parses
@pytest.mark.parametrize("label", EXPORTED)
def test_the_onnx_graph_is_one_tensorrt_parses(fp16_editor, calls, exported, label, tmp_path):
    """The graph ``build_engine`` hands TensorRT's parser: the exported one, rewritten by
    ``tensorrt_graph`` (P2P's ``index_add`` is a ScatterND with a reduction, which the parser
    refuses), valid, static, named as the signature, of operators the parser imports."""
    onnx = pytest.importorskip("onnx")
    signature, tensors, entry = exported[label]
    path = entry.file(GRAPH_FILE)
    onnx.checker.check_model(str(path))  # by path: the weights are external
    model = onnx.load(str(path), load_external_data=False)
    rewritten = trt_backend.tensorrt_graph(model)
    assert (rewritten > 0) == (label != "plain")
    shutil.copy(entry.file(GRAPH_FILE + ".data"), tmp_path)  # beside it, as TensorRT reads it
    onnx.save(model, str(tmp_path / GRAPH_FILE))
    onnx.checker.check_model(str(tmp_path / GRAPH_FILE))
    graph = model.graph

    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx") == OPSET
    assert OPSET in TRT_OPSETS
    assert not model.functions  # no local functions: every node is a plain operator

    def shape(value):
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{value.name} has a dynamic dimension"
        return tuple(d.dim_value for d in dims)

    def kind(value):
        return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)

    assert [i.name for i in graph.input] == [spec.name for spec in signature.inputs]
    for value, spec in zip(graph.input, signature.inputs, strict=True):
        assert shape(value) == spec.shape, value.name
        assert kind(value) in TRT_INPUT_TYPES, (value.name, kind(value))
    with torch.no_grad():
        eager = flat_unet(fp16_editor.model.unet, calls[label][3])(*tensors)
    assert [o.name for o in graph.output] == ["prediction", "maps"][: len(eager)]
    assert [shape(o) for o in graph.output] == [tuple(t.shape) for t in eager]
    assert kind(graph.output[0]) == "FLOAT16"  # an fp16 model's graph computes in fp16

    ops = {node.op_type for node in graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)
    assert ops <= TRT_ONNX_OPS, sorted(ops - TRT_ONNX_OPS)
    constants = {i.name for i in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        where = CONSTANT_INPUTS.get(node.op_type)
        if where is not None and len(node.input) > where and node.input[where]:
            assert node.input[where] in constants, (node.op_type, node.name, "axes not constant")
        if node.op_type == "Resize":
            assert attrs.get("mode", "nearest") in RESIZE_MODES
            assert attrs.get("coordinate_transformation_mode", "half_pixel") in RESIZE_COORDINATES
            assert attrs.get("nearest_mode", "round_prefer_floor") in RESIZE_NEAREST
            assert not attrs.get("antialias", 0)
        if node.op_type == "ScatterND":
            assert attrs.get("reduction", "none") == "none"
        if node.op_type == "LayerNormalization":
            assert not any(out in used for out in node.output[1:] if out)  # only Y is supported
    if label != "plain":
        assert "maps" in [o.name for o in graph.output]

    # the rewritten graph computes what the eager UNet does (ONNX Runtime on the CPU, fp16)
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
    feed = {spec.name: t.numpy() for spec, t in zip(signature.inputs, tensors, strict=True)}
    for want, got in zip(eager, session.run(None, feed), strict=True):
        assert rel(torch.from_numpy(got), want) <= 2e-2


def test_the_scatter_rewrite_gives_the_same_result():
    """ScatterND adding rows onto distinct indices, before and after ``tensorrt_graph``."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    helper, FLOAT, INT64 = onnx.helper, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    graph = helper.make_graph(
        [helper.make_node("ScatterND", ["data", "indices", "updates"], ["out"], name="scatter", reduction="add")],
        "scatter-add",
        [
            helper.make_tensor_value_info("data", FLOAT, [4, 2, 3]),
            helper.make_tensor_value_info("indices", INT64, [2, 1]),
            helper.make_tensor_value_info("updates", FLOAT, [2, 2, 3]),
        ],
        [helper.make_tensor_value_info("out", FLOAT, [4, 2, 3])],
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model = onnx.ModelProto()
    model.CopyFrom(original)
    assert trt_backend.tensorrt_graph(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["GatherND", "Add", "ScatterND"]
    assert not model.graph.node[-1].attribute  # no reduction left
    assert trt_backend.tensorrt_graph(model) == 0  # nothing more to rewrite
    rng = torch.Generator().manual_seed(0)
    feed = {
        "data": torch.randn(4, 2, 3, generator=rng).numpy(),
        "indices": torch.tensor([[3], [1]]).numpy(),
        "updates": torch.randn(2, 2, 3, generator=rng).numpy(),
    }
    outs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for m in (original, model)
    ]
    assert (outs[0] == outs[1]).all()
    want = torch.from_numpy(feed["data"]).index_add(0, torch.tensor([3, 1]), torch.from_numpy(feed["updates"]))
    assert torch.equal(torch.from_numpy(outs[1]), want)


# ---------------------------------------------------------------------- refusals
def test_the_backend_refuses_what_it_cannot_run(monkeypatch):
    assert BACKENDS["tensorrt"] is TensorRTBackend and TensorRTBackend.traced
    assert isinstance(get_backend("TensorRT"), TensorRTBackend)
    with pytest.raises(PyinvError, match="float16 or float32"):
        pyinv.Editor.from_pretrained("tiny", dtype="bf16", backend="tensorrt")
    with pytest.raises(PyinvError, match="the tensorrt backend needs a CUDA GPU"):
        pyinv.Editor.from_pretrained("tiny", device="cpu", backend="tensorrt")
    with pytest.raises(PyinvError, match="needs a CUDA GPU"):
        TensorRTBackend().check(torch.device("cpu"), torch.float16)

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # tensorrt not installed (here or anywhere)
    with pytest.raises(PyinvError, match=r"needs the tensorrt package: pip install 'pyinv\[tensorrt\]'"):
        TensorRTBackend().check(torch.device("cuda"), torch.float16)
    # at load time, before any weights load or move to the GPU (faked present here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PyinvError, match=r"pip install 'pyinv\[tensorrt\]'"):
        pyinv.Editor.from_pretrained("tiny", device="cuda", dtype="fp16", backend="tensorrt")


# ---------------------------------------------------------------------- real engines
@pytest.mark.skipif(not HAS_TRT_GPU, reason="needs tensorrt and a CUDA GPU")
def test_fp16_engines_match_eager_on_the_gpu(image, tmp_path):
    """Engines built from the tiny model's fp16 graphs give eager's outputs (relative error
    ≤ 2e-2); replays of their CUDA graphs give the same; a second backend loads them from the
    cache; a whole edit on the engines lands near eager's."""
    editor = pyinv.Editor.from_pretrained("tiny", device="cuda", dtype="fp16")
    labels = ["p2p-replace", "p2p-refine-reweight-blend", "masactrl", "pnp"]
    gpu_calls = captured_calls(editor, image, labels)
    backend = TensorRTBackend(ExportCache(tmp_path))
    for label, (sample, t, emb, control) in gpu_calls.items():
        want, want_maps = EagerBackend().run(editor.model, sample, t, emb, control)
        got, got_maps = backend.run(editor.model, sample, t, emb, control)
        assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
        assert rel(got, want) <= 2e-2, (label, rel(got, want))
        assert (got_maps is None) == (want_maps is None), label
        if want_maps is not None:
            assert got_maps.dtype == want_maps.dtype and rel(got_maps, want_maps) <= 2e-2, label
        replayed, _ = backend.run(editor.model, sample, t, emb, control)  # the CUDA graph
        assert rel(replayed, got) <= 1e-3, label
        replayed.zero_()  # outputs are the caller's own
        assert rel(backend.run(editor.model, sample, t, emb, control)[0], got) <= 1e-3, label
    assert len(backend.built) == len(gpu_calls)

    cached = TensorRTBackend(ExportCache(tmp_path))
    sample, t, emb, control = gpu_calls["pnp"]
    want, _ = EagerBackend().run(editor.model, sample, t, emb, control)
    assert rel(cached.run(editor.model, sample, t, emb, control)[0], want) <= 2e-2
    assert cached.built == []

    inv = editor.invert(image, SRC, method="direct", steps=6, seed=0)
    eager = editor.edit(inv, "a photo of a blue cube", control=P2P(graph_static=True))
    fast = pyinv.Editor(pyinv.DiffusionModel(**{**vars(editor.model), "backend": backend, "_fp32_copies": {}}))
    inv_fast = fast.invert(image, SRC, method="direct", steps=6, seed=0)
    out = fast.edit(inv_fast, "a photo of a blue cube", control=P2P())
    assert rel(out.latents, eager.latents) <= 5e-2
