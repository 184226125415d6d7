"""The UNet's attention layers, and the stateless processors control runs through.

Control reaches the UNet only through diffusers' public APIs, installed once per model by
:func:`install_control` and never changed afterwards:

- every attention layer gets a :class:`ControlledAttention` processor wrapping the layer's own
  processor (``unet.set_attn_processor``);
- every ResNet block's ``conv2`` gets a forward hook (:func:`_feature_hook`, PnP's feature
  injection).

Both are stateless. What a UNet call is to do comes with the call: a :class:`ControlCall`
holding the step's :class:`~pyinv.control.base.StepControl` (the rule of the edit and the
step's tensors) and a list the call's gathered outputs (LocalBlend's word maps) are appended
to. The processors receive it as ``cross_attention_kwargs["control"]``; the hooks, whose
modules are called without keyword arguments, read it from :func:`current_call`, which
:func:`control_scope` sets for the duration of the call in the calling thread only. A call
without control (inversion, prompt swap) runs every layer's own processor unchanged.

:class:`ControlledAttention` computes the same attention as diffusers' ``AttnProcessor2_0``
(projections, heads, ``scaled_dot_product_attention``, output projection, residual and
rescale) on the layers the rule names, except that ``softmax(Q Kᵀ·s) V`` is the rule's
``attend(name, q, k, v, scale, call)`` with ``q (R, H, n, d)``, ``k, v (R, H, m, d)``
(R = UNet batch rows), which returns ``(R, H, n, d)``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import PyinvError

_NAME = re.compile(
    r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn\d)"
)
_PART_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
#: modules whose ``conv2`` output a rule may replace (ResNet blocks of the UNet)
_RESNET = re.compile(r"(^|\.)resnets\.\d+$")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of the UNet.

    Attributes:
        name: processor name (``"up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"``).
        module: the module's name (the processor name without ``.processor``).
        part: ``"down"``, ``"mid"`` or ``"up"``.
        is_cross: cross-attention (keys from the text) or self-attention.
        index: position among the layers of the same kind (self or cross), in execution order.
        decoder_index: position among the same kind inside the decoder (``-1`` outside it).
        size: ``(h, w)`` of the layer's feature map (its queries are ``h·w`` tokens).
    """

    name: str
    module: str
    part: str
    is_cross: bool
    index: int
    decoder_index: int
    size: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.size[0] * self.size[1]


def attention_layers(unet, latent_size: tuple[int, int]) -> list[AttentionLayer]:
    """The UNet's attention layers in execution order (encoder, middle, decoder).

    Feature-map sizes follow from the block structure: encoder block ``k`` works at the
    latent size halved ``k`` times, the middle and decoder block 0 at the smallest size, and
    decoder block ``k`` at the size of encoder block ``D−1−k`` (``D`` encoder blocks).
    """
    depth = len(unet.config.down_block_types)
    parsed = []
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            raise PyinvError(f"attention control does not know the UNet layer {name!r}")
        part, block, attn_idx, tb, which = m.groups()
        block_i = int(block) if block else 0
        level = {"down_blocks": block_i, "mid_block": depth - 1, "up_blocks": depth - 1 - block_i}[part]
        h, w = latent_size
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        module = name[: -len(".processor")]
        is_cross = _is_cross(unet, module, which)
        key = (_PART_ORDER[part], block_i, int(attn_idx), int(tb), which)
        parsed.append((key, name, module, part.split("_")[0], is_cross, (h, w)))
    parsed.sort(key=lambda item: item[0])
    layers, counts, decoder_counts = [], {True: 0, False: 0}, {True: 0, False: 0}
    for _, name, module, part, is_cross, size in parsed:
        dec = decoder_counts[is_cross] if part == "up" else -1
        layers.append(AttentionLayer(name, module, part, is_cross, counts[is_cross], dec, size))
        counts[is_cross] += 1
        if part == "up":
            decoder_counts[is_cross] += 1
    return layers


def _is_cross(unet, module: str, which: str) -> bool:
    attn = unet.get_submodule(module)
    flag = getattr(attn, "is_cross_attention", None)
    return bool(flag) if flag is not None else which != "attn1"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` on PyTorch's fused kernels (no map is materialised)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------------- one call's control
@dataclass
class ControlCall:
    """What one UNet call carries to the processors and hooks: the step's control and the
    list the call's word maps ``(1 + T, n)`` are appended to (LocalBlend layers only)."""

    step: object  # a pyinv.control.base.StepControl
    maps: list[torch.Tensor] = field(default_factory=list)

    def gathered(self) -> torch.Tensor | None:
        """The call's word maps summed over layers (in execution order), or ``None``."""
        if not self.maps:
            return None
        total = self.maps[0]
        for m in self.maps[1:]:
            total = total + m
        return total


_CURRENT = threading.local()


def current_call() -> ControlCall | None:
    """The control of the UNet call running in this thread (``None`` outside controlled calls)."""
    return getattr(_CURRENT, "call", None)


@contextlib.contextmanager
def control_scope(call: ControlCall | None) -> Iterator[None]:
    """Make ``call`` the :func:`current_call` of this thread for the block."""
    previous = current_call()
    _CURRENT.call = call
    try:
        yield
    finally:
        _CURRENT.call = previous


# ---------------------------------------------------------------------- processors and hooks
class ControlledAttention:
    """Attention processor of one layer: the layer's own processor when the call's rule does
    not name the layer, else the rule's attention (see the module docstring). Holds only the
    layer's name and its own processor; the call's control comes in ``control``."""

    def __init__(self, name: str, original):
        self.name = name
        self.original = original

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        control: ControlCall | None = None,
        **kwargs,
    ) -> torch.Tensor:
        rule = control.step.rule if control is not None else None
        if rule is None or self.name not in rule.layers:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None:
            raise PyinvError("attention control does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        out = rule.attend(self.name, query, key, value, float(attn.scale), control)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _feature_hook(name: str, module, inputs, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on the ``conv2`` of ResNet block ``name``: the call's rule may replace the
    block's residual-branch output (``None`` keeps it)."""
    call = current_call()
    rule = call.step.rule if call is not None else None
    if rule is None or name not in rule.feature_modules:
        return None
    return rule.features(name, output, call)


_INSTALL_LOCK = threading.Lock()


def feature_modules(unet) -> dict[str, torch.nn.Module]:
    """ResNet blocks whose ``conv2`` output control may replace: name → ``conv2``."""
    found = {}
    for name, module in _unwrapped(unet).named_modules():
        conv = getattr(module, "conv2", None)
        if _RESNET.search(name) and isinstance(conv, torch.nn.Module):
            found[name] = conv
    return found


def _unwrapped(unet):
    """The UNet itself under a ``torch.compile`` wrapper (whose module names carry a prefix)."""
    return getattr(unet, "_orig_mod", unet)


def install_control(unet) -> None:
    """Install the processors and hooks of the module docstring on ``unet``, once (a second
    call, also on a ``torch.compile`` wrapper of the same UNet, changes nothing)."""
    unet = _unwrapped(unet)
    with _INSTALL_LOCK:
        if getattr(unet, "_pyinv_control_installed", False):
            return
        processors = dict(unet.attn_processors)
        if processors and not all(isinstance(p, ControlledAttention) for p in processors.values()):
            unet.set_attn_processor(
                {
                    name: p if isinstance(p, ControlledAttention) else ControlledAttention(name, p)
                    for name, p in processors.items()
                }
            )
        for name, conv in feature_modules(unet).items():
            conv.register_forward_hook(partial(_feature_hook, name))
        unet._pyinv_control_installed = True


def controlled_modules(unet) -> tuple[dict, int]:
    """What :func:`install_control` put on ``unet``: the processors by name and the number of
    forward hooks on the UNet's modules (to check that nothing changes during edits)."""
    hooks = sum(len(m._forward_hooks) for m in _unwrapped(unet).modules())
    return dict(unet.attn_processors), hooks


class Rows:
    """Where each branch's passes sit in the UNet batch (from a :class:`~pyinv.loop.BatchLayout`).

    Branch 0 is the source (``layout.has_source``); targets are numbered from 0 in branch
    order. Index tensors built here redirect target rows to source rows, which is how every
    controller in this package expresses "the target reads the source".
    """

    def __init__(self, layout, device: torch.device):
        self.layout = layout
        self.device = device
        self.size = layout.size
        self.source = {kind: layout.row_of(0, kind) for kind in ("uncond", "cond")} if layout.has_source else {}
        first = 1 if layout.has_source else 0
        #: kind → [(row, target number)]
        self.targets: dict[str, list[tuple[int, int]]] = {"uncond": [], "cond": []}
        for r, (branch, kind) in enumerate(layout.rows):
            if branch >= first:
                self.targets[kind].append((r, branch - first))

    def source_row(self, kind: str) -> int:
        row = self.source.get(kind)
        if row is None:
            raise PyinvError(f"the controller needs the source's {kind} pass, which this edit does not run")
        return row

    def index_list(self, mapping: dict[str, str] | None) -> list[int]:
        """Row index: target rows of kind ``k`` → the source row of kind ``mapping[k]``; all
        other rows (and every row when ``mapping`` is ``None``) → themselves."""
        idx = list(range(self.size))
        for kind, source_kind in (mapping or {}).items():
            for row, _ in self.targets[kind]:
                idx[row] = self.source_row(source_kind)
        return idx

    def per_step_index(self, mapping: dict[str, str], active: list[bool]) -> torch.Tensor:
        """``(S, R)`` row indices, one per step: routed by ``mapping`` where ``active``, identity
        elsewhere."""
        routed, identity = self.index_list(mapping), self.index_list(None)
        rows = [routed if on else identity for on in active]
        return torch.tensor(rows, dtype=torch.long).reshape(len(active), self.size).to(self.device)

    def target_index(self, kind: str) -> torch.Tensor:
        return torch.tensor([r for r, _ in self.targets[kind]], dtype=torch.long, device=self.device)

    def target_numbers(self, kind: str) -> list[int]:
        return [t for _, t in self.targets[kind]]
