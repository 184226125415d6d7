"""The exporting backends on SDXL (the ``tiny-xl`` preset, packed embeddings ``(R, 78, D1 + D2)``):
onnxruntime against eager on single UNet calls (plain and controlled) and on a whole Direct +
P2P edit, relative error ≤ 1e-4 in fp32; the cache slots of SDXL graphs, which have the time
ids built in; and the graphs the tensorrt backend exports for tiny-xl, checked as TensorRT's
parser needs them and run through the backend with a stand-in engine (no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from trt_graphs import check_tensorrt_graph, rel
from unet_calls import SRC, captured_calls

import pyinv
from pyinv import P2P, LocalBlend
from pyinv.backends import EagerBackend, OnnxRuntimeBackend, TensorRTBackend
from pyinv.backends import trt as trt_backend
from pyinv.backends.cache import ExportCache
from pyinv.backends.export import GRAPH_FILE, graph_what
from pyinv.backends.flat import flat_inputs, flat_unet
from pyinv.presets import TINY_XL_DIMS

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs pyinv[export]")
pytest.importorskip("onnxscript", reason="the onnxruntime backend needs pyinv[export]")

CONTROLS = ["p2p-replace", "p2p-refine-reweight-blend", "masactrl", "pnp"]
WIDTH = TINY_XL_DIMS["hidden_1"] + TINY_XL_DIMS["hidden_2"]
GPU = {"name": "NVIDIA Test GPU", "capability": "9.0"}
#: the keys of an SD graph's slot (no added conditions: SD slots are what they were)
SD_SLOT_KEYS = {"kind", "model", "graph", "dtype"}


@pytest.fixture(scope="module")
def xl() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny-xl")


@pytest.fixture(scope="module")
def ort_backend():
    return OnnxRuntimeBackend()


@pytest.fixture(scope="module")
def xl_calls(xl, image):
    return captured_calls(xl, image, CONTROLS)


def on_backend(editor: pyinv.Editor, backend, **changes) -> pyinv.DiffusionModel:
    """A copy of the editor's model (the same UNet) running on ``backend``."""
    return pyinv.DiffusionModel(**{**vars(editor.model), "backend": backend, "_fp32_copies": {}, **changes})


def test_unet_calls_match_eager(xl, xl_calls, ort_backend):
    assert set(xl_calls) == {"plain", *CONTROLS}
    errors = {}
    for label, (sample, t, emb, control) in xl_calls.items():
        assert emb.shape[1:] == (78, WIDTH), label  # the packed pooled row
        want, want_maps = EagerBackend().run(xl.model, sample, t, emb, control)
        got, got_maps = ort_backend.run(xl.model, sample, t, emb, control)
        assert got.shape == want.shape and got.dtype == want.dtype
        errors[label] = rel(got, want)
        assert errors[label] <= 1e-4, (label, errors[label])
        assert (got_maps is None) == (want_maps is None), label
        if want_maps is not None:
            assert rel(got_maps, want_maps) <= 1e-4, (label, rel(got_maps, want_maps))
    signatures = {label: flat_inputs(*call)[0] for label, call in xl_calls.items()}
    assert len(set(signatures.values())) == len(signatures)
    for signature in signatures.values():
        assert signature.inputs[2].shape[1:] == (78, WIDTH)
    print("tiny-xl onnxruntime vs eager, relative error per call:", errors)


def test_a_whole_direct_p2p_edit_matches_eager(xl, image, ort_backend):
    """Invert and edit on onnxruntime: the inversion's tensors and the final latents within
    1e-4 (relative) of eager's."""

    def make():
        return P2P(blend=LocalBlend("ball", "cube", threshold=0.9), reweight={"cube": 2.0})

    inv = xl.invert(image, SRC, method="direct", steps=6, seed=0)
    static = make()
    static.graph_static = True
    eager = xl.edit(inv, "a photo of a blue cube", control=static)
    fast = pyinv.Editor(on_backend(xl, ort_backend))
    assert fast.model.family == "SDXL" and fast.model.traced_unet
    inv_fast = fast.invert(image, SRC, method="direct", steps=6, seed=0)
    for name, tensor in inv.tensors.items():
        assert rel(inv_fast.tensors[name], tensor) <= 1e-4, name
    out = fast.edit(inv_fast, "a photo of a blue cube", control=make())
    error = rel(out.latents, eager.latents)
    assert error <= 1e-4, error
    print(f"tiny-xl Direct + P2P edit, onnxruntime vs eager: relative error {error:.2e}")


def test_the_time_ids_are_part_of_the_slot(xl, editor, xl_calls, ort_backend):
    """An SDXL graph has the model's time ids built in: a model loaded at another image size
    (the same UNet, the same fingerprint, the same call shapes) gets graphs of its own, which
    give its eager outputs; an SD model's slot has no added conditions in it."""
    sample, t, emb, _ = xl_calls["plain"]
    signature = flat_inputs(sample, t, emb, None)[0]
    what = graph_what(xl.model, signature)
    assert what["added_conditions"] == {
        "tokens": 77,
        "pooled_dim": TINY_XL_DIMS["pooled"],
        "time_ids": [32.0, 32.0, 0.0, 0.0, 32.0, 32.0],
    }
    other = on_backend(xl, ort_backend, image_size=48)
    assert other.added_conditions.time_ids == (48.0, 48.0, 0.0, 0.0, 48.0, 48.0)
    assert other.fingerprint() == xl.model.fingerprint() and other.unet is xl.model.unet
    slot = ExportCache.slot_of
    assert slot(graph_what(other, signature)) != slot(what)
    assert slot(graph_what(other, signature, optimize=True)) != slot(graph_what(xl.model, signature, optimize=True))
    engines = [trt_backend.engine_what(m, signature, GPU) for m in (xl.model, other)]
    assert slot(engines[0]) != slot(engines[1])

    # the graphs compute with their own time ids (the backend keeps one session per model's
    # added conditions, though the UNet is shared)
    want_32, _ = EagerBackend().run(xl.model, sample, t, emb, None)
    want_48, _ = EagerBackend().run(other, sample, t, emb, None)
    assert rel(want_48, want_32) > 1e-3  # the time ids matter to the tiny UNet
    got_32, _ = ort_backend.run(xl.model, sample, t, emb, None)
    got_48, _ = ort_backend.run(other, sample, t, emb, None)
    assert rel(got_32, want_32) <= 1e-4 and rel(got_48, want_48) <= 1e-4
    records = [*ort_backend.built, *ort_backend.found]
    assert len({entry.path for s, entry in records if s == signature}) == 2  # one graph per image size

    # SD: no added conditions, so the slot's keys (and hence its hash) are what they were
    sd_signature = flat_inputs(torch.zeros(1, 4, 16, 16), t, torch.zeros(1, 77, 32), None)[0]
    assert editor.model.added_conditions is None
    assert set(graph_what(editor.model, sd_signature)) == SD_SLOT_KEYS
    assert set(graph_what(editor.model, sd_signature, optimize=True)) == SD_SLOT_KEYS | {"optimize"}
    assert set(trt_backend.engine_what(editor.model, sd_signature, GPU)) == SD_SLOT_KEYS | {"gpu"}


# ---------------------------------------------------------------------- the tensorrt backend
EXPORTED = ("plain", "p2p-refine-reweight-blend")


@pytest.fixture(scope="module")
def fp16_xl() -> pyinv.Editor:
    """tiny-xl in fp16, the engines' intended precision (eager, on the CPU here)."""
    return pyinv.Editor.from_pretrained("tiny-xl", dtype="fp16", device="cpu")


@pytest.fixture(scope="module")
def fp16_calls(fp16_xl, image):
    return captured_calls(fp16_xl, image, ["p2p-refine-reweight-blend"])


@pytest.fixture(scope="module")
def trt_exported(fp16_xl, fp16_calls):
    """The optimised ONNX graphs TensorRT would parse for tiny-xl's plain and P2P calls,
    exported by the tensorrt backend into the session's cache: ``label → (signature,
    tensors, flat, entry)``."""
    backend = TensorRTBackend()
    model = fp16_xl.model
    entries = {}
    for label in EXPORTED:
        signature, tensors = flat_inputs(*fp16_calls[label])
        flat = flat_unet(model.unet, fp16_calls[label][3], model.added_conditions)
        entries[label] = (signature, tensors, flat, backend.graph_entry(model, signature, flat, tensors))
    return entries


@pytest.mark.parametrize("label", EXPORTED)
def test_the_sdxl_graph_is_one_tensorrt_parses(trt_exported, label, tmp_path):
    signature, tensors, flat, entry = trt_exported[label]
    assert trt_backend.profile_shapes(signature)["embeddings"] == ((tensors[2].shape),) * 3
    assert tuple(tensors[2].shape[1:]) == (78, WIDTH)
    controlled = label != "plain"
    error = check_tensorrt_graph(flat, signature, tensors, entry, tmp_path, rewrites=controlled, maps=controlled)
    print(f"tiny-xl fp16 {label}: rewritten graph (onnxruntime) vs eager, relative error {error:.2e}")


class OrtEngine:
    """Stands in for a TensorRT engine: the rewritten graph TensorRT would parse, run by ONNX
    Runtime on the CPU (``named`` inputs → outputs in graph order)."""

    def __init__(self, graph_entry, directory):
        import shutil

        import onnx
        import onnxruntime as ort

        model = onnx.load(str(graph_entry.file(GRAPH_FILE)), load_external_data=False)
        trt_backend.tensorrt_graph(model)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(graph_entry.file(GRAPH_FILE + ".data"), directory)
        onnx.save(model, str(directory / GRAPH_FILE))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(directory / GRAPH_FILE), options, providers=["CPUExecutionProvider"])

    def __call__(self, named):
        feed = {i.name: named[i.name].numpy() for i in self.session.get_inputs()}
        return [torch.from_numpy(out) for out in self.session.run(None, feed)]


def test_the_tensorrt_backend_runs_sdxl_calls(fp16_xl, fp16_calls, trt_exported, monkeypatch, tmp_path):
    """The tensorrt backend's own path on tiny-xl (its graph from the cache, an engine built
    in its slot and checked against the eager UNet with the added conditions split), with a
    stand-in builder and engine (the rewritten graph on ONNX Runtime): eager's outputs."""
    monkeypatch.setattr(trt_backend, "gpu_identity", lambda device: dict(GPU))
    monkeypatch.setattr(trt_backend, "tensorrt_version", lambda: "10.9.0.34")
    backend = TensorRTBackend()
    profiles = []

    def build(onnx_path, profile, out_path):
        profiles.append(profile)
        out_path.write_bytes(b"engine")

    backend.build_engine = build
    backend.load_engine = lambda entry, graph, device: OrtEngine(graph, tmp_path / entry.path.name)
    model = fp16_xl.model
    for label in EXPORTED:
        sample, t, emb, control = fp16_calls[label]
        want, want_maps = EagerBackend().run(model, sample, t, emb, control)
        got, got_maps = backend.run(model, sample, t, emb, control)
        assert got.dtype == want.dtype and rel(got, want) <= 2e-2, label
        assert (got_maps is None) == (want_maps is None) and (want_maps is None or rel(got_maps, want_maps) <= 2e-2)
    assert [p["embeddings"][0] for p in profiles] == [tuple(trt_exported[label][1][2].shape) for label in EXPORTED]
    assert len(backend.built) == len(EXPORTED)  # the engines, checked against eager
