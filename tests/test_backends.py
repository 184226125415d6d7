"""UNet backends: names, and the compile backend against eager on whole controlled edits."""

from __future__ import annotations

import pytest
import torch

import pyinv
from pyinv import P2P, LocalBlend, PnP
from pyinv.backends import BACKENDS, CompileBackend, EagerBackend, get_backend
from pyinv.errors import PyinvError

SRC, TGT = "a photo of a red ball", "a photo of a blue cube"


def test_backends_by_name():
    assert set(BACKENDS) == {"eager", "compile", "onnxruntime", "tensorrt"}
    assert isinstance(get_backend(None), EagerBackend) and isinstance(get_backend("Compile"), CompileBackend)
    backend = CompileBackend()
    assert get_backend(backend) is backend
    with pytest.raises(PyinvError, match="unknown backend 'onnx'; use one of eager, compile, onnxruntime, tensorrt"):
        get_backend("onnx")
    with pytest.raises(PyinvError, match="unknown backend"):
        pyinv.Editor.from_pretrained("tiny", backend="tensorrt-ish")


def test_the_compile_backend_shares_the_weights_and_compiles_once_per_unet(editor):
    backend = CompileBackend()
    unet = editor.model.unet
    first = backend.runner(unet)
    assert backend.runner(unet) is first and first._orig_mod is unet
    assert EagerBackend().runner(unet) is unet


@pytest.mark.parametrize(
    "method, make, steps",
    [
        ("direct", lambda **kw: P2P(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0}, **kw), 6),
        ("ddim", lambda **kw: PnP(**kw), 6),
        ("edit-friendly", lambda **kw: P2P(**kw), 8),
    ],
)
def test_compiled_edits_equal_eager_ones(editor, image, method, make, steps):
    """The whole edit on the compile backend: final latents within 1e-4 (relative) of eager."""
    inv = editor.invert(image, SRC, method=method, steps=steps, seed=0)
    eager = editor.edit(inv, TGT, control=make(graph_static=True)).latents
    model = pyinv.DiffusionModel(**{**vars(editor.model), "backend": CompileBackend(), "_fp32_copies": {}})
    fast = pyinv.Editor(model)
    assert model.traced_unet
    try:
        out = fast.edit(inv, TGT, control=make()).latents  # static by default on a traced UNet
    finally:
        torch._dynamo.reset()
    err = float((out - eager).norm() / eager.norm())
    assert err <= 1e-4, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph replay needs a CUDA GPU")
@pytest.mark.parametrize(
    "method, make", [("direct", lambda **kw: P2P(blend=LocalBlend("ball", "cube"), **kw)), ("ddim", PnP)]
)
def test_compile_with_cuda_graphs_equals_eager_on_a_gpu(image, method, make):
    """On CUDA the compile backend replays each call signature as a CUDA graph: the edit
    equals eager's (fp32, relative 1e-4), and the graphs are captured once per signature."""
    eager = pyinv.Editor.from_pretrained("tiny", device="cuda")
    backend = CompileBackend()
    fast = pyinv.Editor.from_pretrained("tiny", device="cuda", backend=backend)
    inv = eager.invert(image, SRC, method=method, steps=6, seed=0)
    want = eager.edit(inv, TGT, control=make(graph_static=True)).latents
    try:
        got = fast.edit(inv, TGT, control=make()).latents
        graphs = len(backend._graphed)
        again = fast.edit(inv, TGT, control=make()).latents
    finally:
        torch._dynamo.reset()
    assert graphs == len(backend._graphed) >= 1
    for out in (got, again):
        assert float((out - want).norm() / want.norm()) <= 1e-4


@pytest.mark.usefixtures("tiny_cli_default")
def test_the_command_line_runs_the_unet_on_the_backend_asked_for(tmp_path, monkeypatch, image, capsys):
    """``--backend compile`` on ``pyinv edit``: the edit runs through the compile backend
    (traced here with the cheap aot_eager backend) and writes its image; an unknown name is a
    usage error before anything loads."""
    from pyinv import cli
    from pyinv.cli import common

    real = torch.compile
    compiled = []

    def cheap(module, **kw):
        compiled.append(module)
        return real(module, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", cheap)
    source = tmp_path / "in.png"
    image.save(source)
    out = tmp_path / "out.png"
    argv = ["edit", str(source), "--source", SRC, "--target", TGT, "--steps", "2", "--out", str(out), "-q"]
    try:
        assert cli.main([*argv, "--backend", "compile"]) == 0
    finally:
        torch._dynamo.reset()
    assert out.exists() and len(compiled) == 1
    monkeypatch.setattr(common, "load_editor", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main([*argv, "--backend", "onnx"]) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
