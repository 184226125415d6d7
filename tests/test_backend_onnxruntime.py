"""The onnxruntime backend against eager: single UNet calls (plain and controlled) on the
tiny ε and v models and the demo model, and whole edits; relative error ≤ 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch
from unet_calls import SRC, captured_calls

import pyinv
from pyinv import P2P, LocalBlend, MasaCtrl, PnP
from pyinv.backends import EagerBackend, OnnxRuntimeBackend, get_backend
from pyinv.backends.flat import flat_inputs
from pyinv.errors import PyinvError

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs pyinv[export]")
pytest.importorskip("onnxscript", reason="the onnxruntime backend needs pyinv[export]")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def ort_backend():
    return OnnxRuntimeBackend()


@pytest.mark.parametrize(
    "model_fixture, controls",
    [
        ("editor", ["p2p-replace", "p2p-refine-reweight-blend", "masactrl", "pnp"]),
        ("editor_v", ["p2p-refine-reweight-blend", "pnp"]),
        ("demo_editor", ["p2p-replace", "p2p-refine-reweight-blend", "masactrl", "pnp"]),
    ],
)
def test_unet_calls_match_eager(request, model_fixture, controls, image, ort_backend):
    editor = request.getfixturevalue(model_fixture)
    calls = captured_calls(editor, image, controls)
    assert set(calls) == {"plain", *controls}
    for label, (sample, t, emb, control) in calls.items():
        want, want_maps = EagerBackend().run(editor.model, sample, t, emb, control)
        got, got_maps = ort_backend.run(editor.model, sample, t, emb, control)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel(got, want) <= 1e-4, (label, rel(got, want))
        assert (got_maps is None) == (want_maps is None), label
        if want_maps is not None:
            assert rel(got_maps, want_maps) <= 1e-4, (label, rel(got_maps, want_maps))
    # the control is data: P2P's replace and refine+reweight steps differ only in their
    # tensors, and a second call of a signature reuses its session
    signatures = {label: flat_inputs(*call)[0] for label, call in calls.items()}
    assert len(set(signatures.values())) == len(signatures)


@pytest.fixture(scope="module")
def demo_editor():
    return pyinv.Editor.from_pretrained("demo")


@pytest.mark.parametrize(
    "method, make, steps",
    [
        ("direct", lambda: P2P(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0}), 6),
        ("ddim", lambda: PnP(), 6),
        ("edit-friendly", lambda: P2P(), 8),
    ],
)
def test_whole_edits_match_eager(editor, image, method, make, steps, ort_backend):
    """Invert and edit on the backend: final latents within 1e-4 (relative) of eager's."""
    inv = editor.invert(image, SRC, method=method, steps=steps, seed=0)
    static = make()
    static.graph_static = True
    eager = editor.edit(inv, "a photo of a blue cube", control=static)
    fast = pyinv.Editor(pyinv.DiffusionModel(**{**vars(editor.model), "backend": ort_backend, "_fp32_copies": {}}))
    assert fast.model.traced_unet  # controllers default to one graph per layout
    inv_fast = fast.invert(image, SRC, method=method, steps=steps, seed=0)
    for name, tensor in inv.tensors.items():
        assert rel(inv_fast.tensors[name], tensor) <= 1e-4, name
    out = fast.edit(inv_fast, "a photo of a blue cube", control=make())
    assert rel(out.latents, eager.latents) <= 1e-4


def test_the_backend_refuses_what_it_cannot_run():
    with pytest.raises(PyinvError, match="float32 or float16"):
        pyinv.Editor.from_pretrained("tiny", dtype="bf16", backend="onnxruntime")
    with pytest.raises(PyinvError, match="float16 only on a GPU"):
        pyinv.Editor.from_pretrained("tiny", dtype="fp16", device="cpu", backend="onnxruntime")
    assert isinstance(get_backend("ONNXRuntime"), OnnxRuntimeBackend)


@pytest.mark.usefixtures("tiny_cli_default")
def test_the_command_line_edits_on_the_onnxruntime_backend(tmp_path, image, editor):
    """``pyinv edit --backend onnxruntime`` writes the edit eager writes (to 8-bit rounding
    of a ≤ 1e-4 latent difference: at most one level per pixel)."""
    import numpy as np
    from PIL import Image

    from pyinv import cli

    source = tmp_path / "in.png"
    image.save(source)
    argv = ["edit", str(source), "--source", SRC, "--target", "a photo of a blue cube", "--steps", "3", "-q"]
    outs = {}
    for backend in ("eager", "onnxruntime"):
        outs[backend] = tmp_path / f"{backend}.png"
        assert cli.main([*argv, "--backend", backend, "--out", str(outs[backend])]) == 0
    a, b = (np.asarray(Image.open(outs[k]), dtype=np.int16) for k in ("eager", "onnxruntime"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_concurrent_edits_on_one_backend_equal_serial_ones(editor, image, ort_backend):
    """Threads sharing one backend (its sessions and their first export) give each edit what
    it gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    fast = pyinv.Editor(pyinv.DiffusionModel(**{**vars(editor.model), "backend": ort_backend, "_fp32_copies": {}}))
    inv = fast.invert(image, SRC, method="direct", steps=4, seed=0)
    jobs = [
        ("a photo of a blue ball", lambda: P2P()),
        ("a photo of a big blue cube", lambda: P2P(blend=LocalBlend("ball", "cube"), reweight={"big": 2.0})),
        ("a photo of a blue cube", lambda: MasaCtrl(start_step=1)),
        ("a photo of a green ball", lambda: PnP()),
    ]
    alone = [fast.edit(inv, target, control=make()).latents for target, make in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: fast.edit(inv, job[0], control=job[1]()).latents, jobs * 2))
    for i, latents in enumerate(together):
        assert torch.equal(latents, alone[i % len(jobs)]), jobs[i % len(jobs)][0]
