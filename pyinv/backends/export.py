"""The UNet exported to ONNX, one graph per :class:`~pyinv.backends.flat.GraphSignature`.

A graph is exported from :class:`~pyinv.backends.flat.FlatUNet` with ``torch.onnx.export``
(the ``torch.export``-based exporter): static shapes, inputs ``sample (R, C, h, w)``,
``timestep ()``, ``embeddings (R, L, D)`` and the control tensors by name, outputs
``prediction (R, C, h, w)`` (and ``maps (1 + T, n)`` when the rule gathers LocalBlend's word
maps). An SDXL model's graph takes its packed embeddings ``(R, L + 1, D1 + D2)`` and splits
them inside the graph (:mod:`pyinv.sdxl`), its time ids built in as constants. The plain
graph (no control) serves every uncontrolled call (inversion, prompt swap); a controlled
graph has the rule's layers and active terms built in, and its per-step tensors as inputs,
so one graph serves every step of every edit with that layout. Graphs are kept in the
:class:`~pyinv.backends.cache.ExportCache`, keyed by what they are for (:func:`graph_what`)
and what made them (:func:`graph_key`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import PyinvError
from ..provenance import package_version
from .base import Backend
from .cache import Entry, ExportCache
from .flat import FIXED_INPUTS, FlatUNet, GraphSignature

#: the ONNX opset the graphs are exported at
OPSET = 18
#: the graph file in a cache entry (its weights are beside it in ``unet.onnx.data``)
GRAPH_FILE = "unet.onnx"
#: relative error a newly exported graph or built engine may have against the eager UNet on
#: the call it was made at
PARITY = {torch.float32: 1e-3, torch.float16: 2e-2}

_DIGESTS: dict[int, tuple[torch.nn.Module, str]] = {}
_DIGEST_LOCK = threading.Lock()


def require(module: str, extra: str = "export"):
    """Import an optional dependency, or fail with how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PyinvError(f"this backend needs the {module} package: pip install 'pyinv[{extra}]' ({exc})") from exc


def missing_packages(*modules: str) -> list[str]:
    """Which of ``modules`` are not installed."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def weights_digest(unet: torch.nn.Module) -> str:
    """SHA-256 of every UNet parameter and buffer (names, shapes, dtypes, bytes), computed
    once per UNet: an exported graph holds the weights, so it is keyed by all of them, not
    by the fingerprint's sample of 16 values."""
    with _DIGEST_LOCK:
        found = _DIGESTS.get(id(unet))
        if found is not None and found[0] is unet:
            return found[1]
        h = hashlib.sha256()
        for name, tensor in sorted(unet.state_dict().items()):
            data = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
            h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        _DIGESTS[id(unet)] = (unet, h.hexdigest())
        return _DIGESTS[id(unet)][1]


def graph_what(model, signature: GraphSignature, kind: str = "onnx", optimize: bool = False) -> dict[str, Any]:
    """What a graph is for: the model (its fingerprint and weights), the graph signature
    (layout shapes, control rule and terms) and the dtype; a cache entry's slot. A graph run
    through the ONNX optimizer (``optimize``) is another graph than the plain export, with its
    own slot, so backends wanting one and the other do not replace each other's entries.

    An SDXL model's graph also bakes in how its packed embeddings ``(R, L + 1, D)`` are split
    and its six time ids (the model's image size, :mod:`pyinv.sdxl`), which are constants of
    the graph, not inputs: they are part of the slot (``added_conditions``: ``tokens`` L,
    ``pooled_dim`` P, ``time_ids``), so a model loaded at another image size gets graphs of
    its own. An SD model has no such key and keeps the slots it had."""
    what = {
        "kind": kind,
        "model": {"fingerprint": model.fingerprint(), "weights_sha256": weights_digest(model.unet)},
        "graph": signature.doc(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    added = model.added_conditions
    if added is not None:
        what["added_conditions"] = {
            "tokens": int(added.tokens),
            "pooled_dim": int(added.pooled_dim),
            "time_ids": [float(v) for v in added.time_ids],
        }
    if optimize:
        what["optimize"] = True
    return what


def graph_key(opset: int = OPSET, optimize: bool = True) -> dict[str, Any]:
    """What a graph is made with: opset, exporter settings and library versions."""
    import pyinv

    return {
        "opset": opset,
        "optimize": optimize,
        "versions": {
            "pyinv": pyinv.__version__,
            "torch": torch.__version__,
            "diffusers": package_version("diffusers"),
            "onnx": package_version("onnx"),
            "onnxscript": package_version("onnxscript"),
        },
    }


def output_names(flat: FlatUNet, args) -> list[str]:
    """``["prediction"]``, plus ``"maps"`` when the call gathers word maps."""
    with torch.no_grad():
        outs = flat(*args)
    return ["prediction", "maps"][: len(outs)]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines and warnings (torchvision absent, deprecations) are
    not the user's business; its errors still surface."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_graph(
    flat: FlatUNet, args, signature: GraphSignature, directory: Path, opset: int = OPSET, optimize: bool = True
) -> list[str]:
    """Export ``flat`` on ``args`` (tensors in graph order) to ``directory/unet.onnx`` with
    its weights in ``unet.onnx.data``; returns the output names."""
    require("onnx")
    require("onnxscript")
    names = [*FIXED_INPUTS, *signature.control_names]
    outputs = output_names(flat, args)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                flat.eval(),
                tuple(args),
                None,
                dynamo=True,
                opset_version=opset,
                optimize=optimize,
                input_names=names,
                output_names=outputs,
                verbose=False,
            )
            program.save(str(directory / GRAPH_FILE), external_data=True)
    except PyinvError:
        raise
    except Exception as exc:  # the exporter's own error types are many and unstable
        raise PyinvError(f"exporting the UNet to ONNX failed ({signature.describe()}): {exc}") from exc
    return outputs


def check_parity(what: str, got, want, dtype: torch.dtype, signature: GraphSignature) -> None:
    """``got`` (a new graph's or engine's outputs) must equal ``want`` (the eager UNet's on
    the same call) within :data:`PARITY`, output by output, or ``PyinvError``."""
    for name, w, g in zip(("prediction", "maps"), want, got, strict=False):
        w, g = w.float(), g.to(w.device).float()
        err = float((g - w).norm() / w.norm().clamp_min(1e-12))
        if not err <= PARITY[dtype]:
            raise PyinvError(
                f"the {what} ({signature.describe()}) differs from the eager UNet: "
                f"relative error of its {name} {err:.2e} > {PARITY[dtype]:.0e}"
            )


class ExportingBackend(Backend):
    """What the backends running exported graphs share: the export cache, the exporter
    settings, what they made per (UNet, signature, device), and the record of what they built
    and found cached (``pyinv export``'s summary).

    Attributes:
        cache: the :class:`~pyinv.backends.cache.ExportCache`.
        built: ``(signature, entry)`` of what this backend exported or built, in order.
        found: ``(signature, entry)`` of what it found already in the cache, in order.
    """

    traced = True

    def __init__(self, cache: ExportCache | str | None = None, opset: int = OPSET, optimize: bool = False):
        self.cache = cache if isinstance(cache, ExportCache) else ExportCache(cache)
        self.opset = opset
        self.optimize = optimize
        self.built: list[tuple[GraphSignature, Entry]] = []
        self.found: list[tuple[GraphSignature, Entry]] = []
        self._made: dict[tuple, tuple[torch.nn.Module, Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache={self.cache!r})"

    def graph_entry(self, model, signature: GraphSignature, flat: FlatUNet, tensors) -> Entry:
        """The ONNX graph of ``signature`` from the export cache, exported there if absent."""
        return self.cache.get_or_build(
            graph_what(model, signature, optimize=self.optimize),
            graph_key(self.opset, self.optimize),
            lambda directory: export_graph(flat, tensors, signature, directory, self.opset, self.optimize),
        )

    def made_for(self, model, signature: GraphSignature, make):
        """What ``make()`` makes for the model's UNet, its added conditions and ``signature``,
        once per process (concurrent first calls wait for one to make it). The added
        conditions are part of the key: two SDXL models sharing one UNet at other image sizes
        have other time ids built into their graphs."""
        key = (id(model.unet), signature, str(model.device), model.added_conditions)
        found = self._made.get(key)
        if found is not None and found[0] is model.unet:
            return found[1]
        with self._lock:
            found = self._made.get(key)
            if found is None or found[0] is not model.unet:
                found = self._made[key] = (model.unet, make())
            return found[1]

    def record(self, signature: GraphSignature, entry: Entry) -> None:
        """Note an entry this backend built or found (``built`` / ``found``)."""
        (self.built if entry.built else self.found).append((signature, entry))
