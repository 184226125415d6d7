"""Attention layers of a UNet, and the attention processor controllers install.

Controllers are attached only through diffusers' public attention-processor API
(``unet.attn_processors`` / ``unet.set_attn_processor``): a layer a controller touches
gets a :class:`ControlledAttention` processor, every other layer keeps its own, and
:func:`restore` puts the saved processors back.

:class:`ControlledAttention` computes the same attention as diffusers'
``AttnProcessor2_0`` (projections, heads, ``scaled_dot_product_attention``, output
projection, residual and rescale), except that the step ``softmax(Q Kᵀ·s) V`` is handed to
the controller as ``controller.attend(layer, q, k, v, scale)`` with ``q (R, H, n, d)``,
``k, v (R, H, m, d)`` (R = UNet batch rows). The controller returns ``(R, H, n, d)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PyinvError

_NAME = re.compile(
    r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn\d)"
)
_PART_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


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


class ControlledAttention:
    """Attention processor that delegates ``softmax(QKᵀ·s)V`` to a controller (see module doc)."""

    def __init__(self, controller, layer: AttentionLayer):
        self.controller = controller
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
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
        out = self.controller.attend(self.layer, query, key, value, float(attn.scale))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` on PyTorch's fused kernels (no map is materialised)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def install(unet, processors: dict) -> dict:
    """Set the given processors (name → processor); returns the saved full mapping."""
    saved = dict(unet.attn_processors)
    if processors:
        unet.set_attn_processor({name: processors.get(name, proc) for name, proc in saved.items()})
    return saved


def restore(unet, saved: dict | None) -> None:
    if saved:
        unet.set_attn_processor(dict(saved))


class Rows:
    """Where each branch's passes sit in the UNet batch (from a :class:`BatchLayout`).

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

    def index(self, mapping: dict[str, str] | None) -> torch.Tensor:
        """``(R,)`` row index: target rows of kind ``k`` → the source row of kind ``mapping[k]``;
        all other rows (and every row when ``mapping`` is ``None``) → themselves."""
        idx = list(range(self.size))
        for kind, source_kind in (mapping or {}).items():
            for row, _ in self.targets[kind]:
                idx[row] = self.source_row(source_kind)
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def target_index(self, kind: str) -> torch.Tensor:
        return torch.tensor([r for r, _ in self.targets[kind]], dtype=torch.long, device=self.device)

    def target_numbers(self, kind: str) -> list[int]:
        return [t for _, t in self.targets[kind]]


class AttentionController:
    """Mixin base of the attention controllers: installs :class:`ControlledAttention` on
    the layers :meth:`controlled_layers` picks and the forward hooks :meth:`forward_hooks`
    returns, and keeps the batch rows (:class:`Rows`) and step bookkeeping.

    ``graph_static=True`` computes every controlled term at every step (identity indices,
    zero matrices outside the windows), so one UNet graph serves all steps, as a compiled or
    exported UNet needs; the default skips work that is a no-op at a given step. A compiled
    UNet guards on what the processors read, so in that mode the per-step tensors keep their
    shapes, exist from the first step (never ``None`` first) and are never one tensor under
    two names at one step and two tensors at another (dynamo guards on such aliasing).
    """

    graph_static: bool = False

    def controlled_layers(self, layers: list[AttentionLayer]) -> list[AttentionLayer]:
        return []

    def forward_hooks(self, unet) -> list[tuple[torch.nn.Module, object]]:
        return []

    def attend(self, layer: AttentionLayer, q, k, v, scale: float) -> torch.Tensor:
        return sdpa(q, k, v, scale)

    def install(self, model, layout, program) -> None:
        self.rows = Rows(layout, model.device)
        self.num_steps = program.schedule.num_steps
        self.first_step = program.first_step
        self.latent_size = tuple(int(s) for s in program.start.shape[-2:])
        chosen = self.controlled_layers(attention_layers(model.unet, self.latent_size))
        self.install_state(model)
        self._saved = install(model.unet, {layer.name: ControlledAttention(self, layer) for layer in chosen})
        self._hooks = [module.register_forward_hook(fn) for module, fn in self.forward_hooks(model.unet)]

    def install_state(self, model) -> None:
        """Per-edit tensors that depend on the batch layout (called by :meth:`install`, after
        :meth:`controlled_layers`)."""

    def remove(self, model) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        restore(model.unet, getattr(self, "_saved", None))
        self._saved = None
        self.clear_state()

    def clear_state(self) -> None:
        """Drop the edit's device and per-step tensors (``_``-prefixed). What :meth:`prepare`
        built from the prompts (small CPU token maps) stays until the next edit."""
        for name, value in list(vars(self).items()):
            if name.startswith("_") and isinstance(value, torch.Tensor):
                setattr(self, name, None)
