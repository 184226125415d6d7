"""UNet calls captured from real edits of a model, for the backends' tests: ``captured_calls``."""

from __future__ import annotations

from pyinv import P2P, LocalBlend, MasaCtrl, PnP
from pyinv.backends import EagerBackend

SRC = "a photo of a red ball"
CONTROLS = {
    "p2p-replace": ("a photo of a blue ball", lambda: P2P(graph_static=True)),
    "p2p-refine-reweight-blend": (
        "a photo of a big blue cube",
        lambda: P2P(blend=LocalBlend("ball", "cube", threshold=0.9), reweight={"big": 2.0}, graph_static=True),
    ),
    "masactrl": ("a photo of a blue cube", lambda: MasaCtrl(start_step=1, graph_static=True)),
    "pnp": ("a photo of a blue cube", lambda: PnP(graph_static=True)),
}


def captured_calls(editor, image, controls, steps=4):
    """The UNet calls of an inversion (plain) and of one edit per control (their second
    step): ``label → (sample, timestep, embeddings, StepControl or None)``."""
    model = editor.model
    calls: dict[str, tuple] = {}
    real = model.backend

    class Spy(EagerBackend):
        label = "plain"
        seen = 0

        def run(self, m, sample, timestep, embeddings, control):
            Spy.seen += 1
            if Spy.label not in calls and (control is not None or Spy.label == "plain") and Spy.seen >= 2:
                calls[Spy.label] = (sample.clone(), timestep.clone(), embeddings.clone(), control)
            return real.run(m, sample, timestep, embeddings, control)

    model.backend = Spy()
    try:
        inv = editor.invert(image, SRC, method="direct", steps=steps, seed=0)
        for label in controls:
            Spy.label, Spy.seen = label, 0
            target, make = CONTROLS[label]
            editor.edit(inv, target, control=make())
    finally:
        model.backend = real
    return calls
