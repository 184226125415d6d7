"""pyinv: fast inversion of real images into text-to-image diffusion models, and text editing.

Public API::

    editor = pyinv.Editor.from_pretrained("tiny", device="cpu", dtype="fp32")
    inv = editor.invert("image.png", "a photo of a cat", method="direct", steps=50)
    out = editor.edit(inv, "a photo of a dog", guidance=7.5)
    out.images[0].save("dog.png")
"""

from .api import Editor, EditResult
from .control import P2P, Controller, LocalBlend, MasaCtrl, PnP
from .errors import PyinvError
from .inversion import METHODS, Inversion
from .models import DiffusionModel, load_model

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "P2P",
    "Controller",
    "DiffusionModel",
    "EditResult",
    "Editor",
    "Inversion",
    "LocalBlend",
    "MasaCtrl",
    "PnP",
    "PyinvError",
    "__version__",
    "load_model",
]
