"""One compiled UNet graph per batch layout serves every step of a controlled edit.

The UNet is compiled with ``torch.compile(fullgraph=True, dynamic=False)`` and called on the
real path (:meth:`DiffusionModel.unet_forward`: the timestep goes in as a 0-d tensor), with
a backend that records each graph dynamo hands it and runs it as traced (graph capture
without code generation, which is the part that can fail). Under ``fullgraph=True`` every
compile, first or re-, hands over exactly one graph, so counting graphs counts compiles: a
guard that fails at some step of an edit (a step-dependent Python value, a tensor that is
``None`` at first, two names for one tensor at some steps only) shows up as a second graph.
``TORCH_LOGS=recompiles`` names the guard.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pyinv
from pyinv import P2P, LocalBlend, MasaCtrl, PnP

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
TGT2 = "a photo of a green cube"
STEPS = 8

CONTROLLERS = {
    "p2p": lambda: P2P(
        edit="refine", blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0}, graph_static=True
    ),
    "masactrl": lambda: MasaCtrl(start_step=1, graph_static=True),
    "pnp": lambda: PnP(graph_static=True),
}


@pytest.fixture(scope="module")
def inv(editor, image):
    return editor.invert(image, SRC, method="direct", steps=STEPS)


def compiled_editor(editor) -> tuple[pyinv.Editor, list]:
    """An editor whose UNet is compiled (weights shared) and the list its graphs land in."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    unet = torch.compile(editor.model.unet, backend=record, fullgraph=True, dynamic=False)
    return pyinv.Editor(dataclasses.replace(editor.model, unet=unet), progress=False), graphs


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_one_graph_per_layout_over_whole_edits(editor, inv, name):
    make = CONTROLLERS[name]
    layouts = {1: [TGT], 2: [TGT, TGT2]}  # one target, two targets: two batch layouts
    eager = {k: editor.edit(inv, targets, control=make()).latents for k, targets in layouts.items()}
    torch._dynamo.reset()
    try:
        fast, graphs = compiled_editor(editor)
        for count, (k, targets) in enumerate(layouts.items(), start=1):
            for _ in range(2):  # a second edit (a new controller object) compiles nothing
                out = fast.edit(inv, targets, control=make())
                assert len(graphs) == count, f"{name}, {k} target(s): {len(graphs)} graphs for {count} layouts"
                assert out.unet_calls == STEPS
                assert torch.equal(out.latents, eager[k])
    finally:
        torch._dynamo.reset()


def test_default_controllers_apply_every_term_under_a_compiled_unet(editor, inv):
    """Without ``graph_static`` a controller applies its control at every step exactly when the
    UNet is compiled, so its whole edit is one graph, equal to the eager edit that does the same."""
    make = lambda **kw: P2P(edit="refine", blend=LocalBlend("ball", "cube", threshold=0.97), **kw)  # noqa: E731
    assert make().graph_static is None and not editor.model.traced_unet
    eager = editor.edit(inv, [TGT], control=make(graph_static=True)).latents
    torch._dynamo.reset()
    try:
        fast, graphs = compiled_editor(editor)
        assert fast.model.traced_unet
        out = fast.edit(inv, [TGT], control=make())
        assert len(graphs) == 1
        assert torch.equal(out.latents, eager)
    finally:
        torch._dynamo.reset()
