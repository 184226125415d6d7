"""pyinv: fast inversion of real images into text-to-image diffusion models, and text editing.

Public API::

    editor = pyinv.Editor.from_pretrained("tiny", device="cpu", dtype="fp32")
    inv = editor.invert("image.png", "a photo of a cat", method="direct", steps=50)
    out = editor.edit(inv, "a photo of a dog", guidance=7.5)
    out.images[0].save("dog.png")
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name → the module that defines it; imported on first use (PEP 562), so that
#: ``import pyinv.cli`` stays light and the command line handles Ctrl-C while torch loads
_EXPORTS = {
    "Editor": ".api",
    "EditResult": ".api",
    "EditSpec": ".api",
    "P2P": ".control",
    "Controller": ".control",
    "LocalBlend": ".control",
    "MasaCtrl": ".control",
    "PnP": ".control",
    "PyinvError": ".errors",
    "METHODS": ".inversion",
    "Inversion": ".inversion",
    "DiffusionModel": ".models",
    "load_model": ".models",
    "Client": ".serve.client",
}

if TYPE_CHECKING:
    from .api import Editor, EditResult, EditSpec
    from .control import P2P, Controller, LocalBlend, MasaCtrl, PnP
    from .errors import PyinvError
    from .inversion import METHODS, Inversion
    from .models import DiffusionModel, load_model
    from .serve.client import Client


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "METHODS",
    "P2P",
    "Client",
    "Controller",
    "DiffusionModel",
    "EditResult",
    "EditSpec",
    "Editor",
    "Inversion",
    "LocalBlend",
    "MasaCtrl",
    "PnP",
    "PyinvError",
    "__version__",
    "load_model",
]
