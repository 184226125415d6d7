"""Installed controllers keep the UNet traceable as one graph (``torch.compile(fullgraph=True)``).

``graph_static=True`` makes the per-step control plain tensors (identity indices and zero
matrices outside the windows), so the traced UNet is the same at every step. The test
traces with the ``eager`` backend (graph capture without code generation, which is what
can fail) and checks the compiled edit equals the eager one.
"""

from __future__ import annotations

import pytest
import torch

from pyinv import P2P, LocalBlend, MasaCtrl, PnP

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"


@pytest.mark.parametrize(
    "make",
    [
        lambda: P2P(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0}, graph_static=True),
        lambda: MasaCtrl(start_step=1, graph_static=True),
        lambda: PnP(graph_static=True),
    ],
    ids=["p2p", "masactrl", "pnp"],
)
def test_controlled_unet_compiles_as_one_graph(editor, image, monkeypatch, make):
    model = editor.model
    inv = editor.invert(image, SRC, method="direct", steps=3)
    eager = editor.edit(inv, TGT, control=make()).latents

    torch._dynamo.reset()
    compiled = torch.compile(model.unet, backend="eager", fullgraph=True)

    def compiled_forward(latents, t, embeddings):
        model.unet_calls += 1
        model.unet_image_forwards += latents.shape[0]
        out = compiled(latents.to(model.dtype), t, encoder_hidden_states=embeddings.to(model.dtype), return_dict=False)
        return out[0].to(model.latent_dtype)

    monkeypatch.setattr(model, "unet_forward", compiled_forward)
    out = editor.edit(inv, TGT, control=make()).latents
    torch._dynamo.reset()
    assert torch.equal(out, eager)
