"""A UNet call as tensors in, tensors out: what exported graphs and CUDA graphs run.

A controlled UNet call is ``(sample, timestep, embeddings, control)`` with the control a
:class:`~pyinv.control.base.StepControl`: a rule (plain values, the same at every step of an
edit), the terms active at the step, and the step's tensors. With the rule and the active
terms fixed, the call is a function of tensors only:

    (sample (R, C, h, w), timestep (), embeddings (R, L, D), x_1 … x_k) → (prediction (R, C, h, w)[, maps (1 + T, n)])

where ``x_1 … x_k`` are the step's control tensors in name order and ``maps`` are
LocalBlend's word maps the call gathers (rules that gather none return the prediction only).
:class:`FlatUNet` is that function as a module; :class:`GraphSignature` is everything one
graph of it is specialised to (shapes, dtypes, the rule, the active terms), with a canonical,
process-independent form for cache keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..control.attention import ControlCall, control_scope
from ..errors import PyinvError
from ..sdxl import unet_kwargs

#: the graph's fixed inputs, before the control tensors
FIXED_INPUTS = ("sample", "timestep", "embeddings")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype (``"float32"``, …) of one graph input."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(int(s) for s in tensor.shape), str(tensor.dtype).removeprefix("torch."))

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSignature:
    """What one graph of a UNet call is specialised to.

    Attributes:
        inputs: the graph's inputs in order: ``sample``, ``timestep``, ``embeddings``, then
            the control tensors in name order.
        rule: the control rule's canonical JSON (:func:`canonical_rule`), ``""`` for a call
            without control (the plain graph).
        active: the rule's terms applied, sorted.
    """

    inputs: tuple[TensorSpec, ...]
    rule: str = ""
    active: tuple[str, ...] = ()

    @property
    def controlled(self) -> bool:
        return bool(self.rule)

    @property
    def control_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs[len(FIXED_INPUTS) :])

    @property
    def batch(self) -> int:
        """UNet batch rows ``R`` (the layout's size)."""
        return self.inputs[0].shape[0]

    def doc(self) -> dict[str, Any]:
        """The signature as plain JSON data (the cache key's ``graph`` part)."""
        return {
            "inputs": [spec.doc() for spec in self.inputs],
            "rule": json.loads(self.rule) if self.rule else None,
            "active": list(self.active),
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> GraphSignature:
        """The signature :meth:`doc` describes (a cache entry's ``graph``); a malformed doc
        raises ``KeyError``, ``TypeError`` or ``ValueError``."""
        inputs = tuple(
            TensorSpec(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"])) for d in doc["inputs"]
        )
        if not inputs:
            raise ValueError("a graph has inputs")
        rule = doc.get("rule")
        text = "" if rule is None else json.dumps(rule, sort_keys=True, separators=(",", ":"))
        return cls(inputs, text, tuple(str(a) for a in doc.get("active", ())))

    def digest(self) -> str:
        """A short hash of :meth:`doc`, the same in every process."""
        text = json.dumps(self.doc(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """``"R=3 64×64 p2p(cross,maps,self)"``: for progress bars and summaries."""
        _, _, h, w = self.inputs[0].shape
        what = "plain"
        if self.controlled:
            kind = json.loads(self.rule)["type"].rsplit(".", 1)[-1].removesuffix("Rule").lower()
            what = f"{kind}({','.join(self.active)})"
        return f"R={self.batch} {h}×{w} {what}"


def _canonical(value: Any, where: str) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, frozenset | set):
        items = [_canonical(v, where) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, tuple | list):
        return [_canonical(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, where) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name), where) for f in dataclasses.fields(value)}
    raise PyinvError(f"a control rule holds only plain values; {where} is a {type(value).__name__}")


def canonical_rule(rule) -> str:
    """The rule as canonical JSON: its class and its fields, sets sorted (the same text in
    every process, unlike ``repr`` of a set of strings)."""
    kind = type(rule)
    doc = {"type": f"{kind.__module__}.{kind.__qualname__}", "fields": _canonical(rule, kind.__name__)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def flat_inputs(sample, timestep, embeddings, control) -> tuple[GraphSignature, list[torch.Tensor]]:
    """The call's signature and its inputs in graph order."""
    tensors = [sample, timestep, embeddings]
    specs = [TensorSpec.of(name, t) for name, t in zip(FIXED_INPUTS, tensors, strict=True)]
    if control is None:
        return GraphSignature(tuple(specs)), tensors
    names = sorted(control.inputs)
    for name in names:
        if name in FIXED_INPUTS:
            raise PyinvError(f"a control input may not be called {name!r}")
        tensor = control.inputs[name]
        specs.append(TensorSpec.of(name, tensor))
        tensors.append(tensor)
    return GraphSignature(tuple(specs), canonical_rule(control.rule), tuple(sorted(control.active))), tensors


def example_inputs(signature: GraphSignature, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Zero tensors of the signature's shapes and dtypes (for building graphs ahead of a call)."""
    return [torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype), device=device) for spec in signature.inputs]


class FlatUNet(torch.nn.Module):
    """The UNet call of the module docstring as ``forward(sample, timestep, embeddings, *xs)``,
    for one rule and one set of active terms (``rule=None``: the plain call)."""

    def __init__(
        self, unet: torch.nn.Module, rule=None, active: Sequence[str] = (), names: Sequence[str] = (), added=None
    ):
        super().__init__()
        self.unet = unet
        self.added = added
        self.rule = rule
        self.active = frozenset(active)
        self.names = tuple(names)

    def forward(self, sample, timestep, embeddings, *xs):
        conditions = unet_kwargs(embeddings, self.added)
        if self.rule is None:
            return (self.unet(sample, timestep, **conditions, return_dict=False)[0],)
        from ..control.base import StepControl

        call = ControlCall(StepControl(self.rule, dict(zip(self.names, xs, strict=True)), self.active))
        with control_scope(call):
            kwargs = {"control": call}
            out = self.unet(sample, timestep, **conditions, cross_attention_kwargs=kwargs, return_dict=False)
        maps = call.gathered()
        return (out[0],) if maps is None else (out[0], maps)


def flat_unet(unet: torch.nn.Module, control, added=None) -> FlatUNet:
    """:class:`FlatUNet` for calls like this one (``control`` a StepControl or ``None``;
    ``added`` the model's :class:`~pyinv.sdxl.AddedConditions` or ``None``)."""
    if control is None:
        return FlatUNet(unet, added=added)
    return FlatUNet(unet, control.rule, control.active, sorted(control.inputs), added=added)
