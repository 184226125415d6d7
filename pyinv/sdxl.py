"""Stable Diffusion XL's added conditions, packed into the one embeddings tensor pyinv moves.

SDXL's UNet takes, besides the text encoders' hidden states ``(B, L, D)`` (CLIP ViT-L's and
OpenCLIP bigG's penultimate hidden states concatenated on the feature axis, D = D1 + D2), the
second encoder's pooled, projected output ``text_embeds (B, P)`` and ``time_ids (B, 6)`` =
(original height, width, crop top, left, target height, width). Every method, program and
controller of pyinv moves one embeddings tensor ``(R, L, D)`` per UNet row, so an SDXL
model's embeddings are ``(R, L + 1, D)``: rows ``0 … L − 1`` the hidden states, row ``L`` the
pooled embedding zero-padded from P to D. :meth:`AddedConditions.unet_kwargs` splits them
back at every UNet call; the time ids are the same for every row (the model's image size,
no crop, read when the call is made: a model whose ``image_size`` is changed gets its new
ids), so they are not part of the tensor.

An SD 1.x/2.x model has no added conditions (``None``), and its embeddings are passed as-is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import PyinvError


@dataclass(frozen=True)
class AddedConditions:
    """What an SDXL UNet takes besides the hidden states, and how the packed tensor holds it.

    Attributes:
        tokens: L, the text tokens (rows of hidden states) before the pooled row.
        pooled_dim: P, the width of the pooled embedding (``text_embeds``).
        time_ids: the six SDXL micro-conditions, the same for every row.
    """

    tokens: int
    pooled_dim: int
    time_ids: tuple[float, float, float, float, float, float]

    def for_size(self, image_size: int) -> AddedConditions:
        """These conditions for ``image_size²`` images: time ids (size, size, 0, 0, size, size)."""
        return replace(self, time_ids=square_time_ids(image_size))

    def unet_kwargs(self, embeddings: torch.Tensor) -> dict[str, Any]:
        """``encoder_hidden_states (R, L, D)`` and ``added_cond_kwargs`` (``text_embeds (R, P)``,
        ``time_ids (R, 6)``) of the UNet call for packed ``embeddings (R, L + 1, D)``. The time
        ids are made by fills on the embeddings' device (no host copy), so the split may run
        inside a traced, exported or captured graph, where they are constants.

        ``text_embeds`` come at least in float32: the UNet concatenates them with its float32
        embedding of the time ids, which promotes a float16 row to float32 anyway (the same
        values). Cast here, that concatenation is of one type in an exported graph too, where
        the exporter would not insert the promotion (ONNX's ``Concat`` takes one type)."""
        rows = embeddings.shape[0]
        time_ids = torch.stack([embeddings.new_full((rows,), float(v)) for v in self.time_ids], dim=1)
        pooled = embeddings[:, self.tokens, : self.pooled_dim]
        pooled = pooled.to(torch.promote_types(pooled.dtype, torch.float32))
        return {
            "encoder_hidden_states": embeddings[:, : self.tokens],
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }


def square_time_ids(image_size: int) -> tuple[float, float, float, float, float, float]:
    """SDXL's micro-conditions for an uncropped ``image_size²`` image: (original height, width,
    crop top, left, target height, width) = (size, size, 0, 0, size, size), as diffusers' SDXL
    pipelines make them for an image of that size."""
    size = float(image_size)
    return (size, size, 0.0, 0.0, size, size)


def unet_kwargs(embeddings: torch.Tensor, added: AddedConditions | None) -> dict[str, Any]:
    """The conditioning keyword arguments of a UNet call (``added=None``: SD's plain call)."""
    if added is None:
        return {"encoder_hidden_states": embeddings}
    return added.unet_kwargs(embeddings)


def added_conditions(unet, text_encoder_2, tokens: int, width: int, image_size: int) -> AddedConditions | None:
    """The added conditions of a UNet (``None`` unless it is SDXL-shaped: ``addition_embed_type
    "text_time"``). ``width`` is D, the packed tensor's feature width; a pooled embedding wider
    than that cannot be packed and is refused."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return None
    if text_encoder_2 is None:
        raise PyinvError("this UNet takes SDXL's added conditions but the model has no second text encoder")
    pooled = int(getattr(text_encoder_2.config, "projection_dim", 0) or 0)
    if pooled < 1:
        raise PyinvError("the second text encoder has no projection (SDXL's pooled text embedding)")
    if pooled > width:
        raise PyinvError(
            f"the pooled text embedding ({pooled} wide) is wider than the hidden states ({width}); "
            "pyinv packs it as one row of the embeddings and cannot run this checkpoint"
        )
    return AddedConditions(tokens=int(tokens), pooled_dim=pooled, time_ids=square_time_ids(image_size))


def encode_sdxl(
    ids: torch.Tensor, ids_2: torch.Tensor, text_encoder, text_encoder_2, dtype: torch.dtype
) -> torch.Tensor:
    """Packed SDXL embeddings ``(B, L + 1, D1 + D2)`` of token ids for both encoders:
    penultimate hidden states of each, concatenated on the feature axis, and the second
    encoder's ``text_embeds`` zero-padded to D1 + D2 as the last row."""
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2].to(dtype), second.hidden_states[-2].to(dtype)], dim=-1)
    pooled = second.text_embeds.to(dtype)
    row = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
    row[:, 0, : pooled.shape[1]] = pooled
    return torch.cat([hidden, row], dim=1)
