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
from trt_graphs import check_tensorrt_graph
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
    signature, tensors, entry = exported[label]
    flat = flat_unet(fp16_editor.model.unet, calls[label][3])
    controlled = label != "plain"
    check_tensorrt_graph(flat, signature, tensors, entry, tmp_path, rewrites=controlled, maps=controlled)


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
