"""Diffusers Stable Diffusion folders and hub ids: reading their components, writing a model.

A folder holds ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/scheduler_config.json``
and, for latent models, ``vae/`` (a pixel-space model has none). :func:`load_diffusers`
returns the components as the dict a preset builder returns (``unet``, ``vae``,
``text_encoder``, ``tokenizer``, ``scheduler_config``, ``image_size``); both
:mod:`pyinv.presets` (the shipped demo model) and :mod:`pyinv.models` use it, and it uses
neither.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .errors import PyinvError


def looks_like_path(name: str) -> bool:
    """Whether ``name`` reads as a file-system path rather than a hub id (``owner/model``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_diffusers(name: str, presets: Sequence[str] = ()) -> dict[str, Any]:
    """Components of a diffusers Stable Diffusion folder or hub id.

    ``presets``: the preset names, only to list them when ``name`` is none of these things.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    known = f" (presets: {', '.join(presets)})" if presets else ""
    path = os.path.expanduser(name)
    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or looks_like_path(name)):
        raise PyinvError(f"model folder not found: {name}{known}")
    if local and not os.path.isdir(os.path.join(path, "unet")):
        raise PyinvError(f"{name} is not a diffusers Stable Diffusion folder (no unet/ inside)")
    source = path if local else name
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        has_vae = os.path.isdir(os.path.join(path, "vae")) if local else True
        vae = None
        if has_vae:
            try:
                vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
            except OSError:
                if not local:
                    vae = None
                else:
                    raise
        scheduler_config = read_scheduler_config(source, local)
    except PyinvError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not local:
            listed = f"a preset ({', '.join(presets)}), " if presets else ""
            raise PyinvError(
                f"cannot load model {name!r}: not {listed}a local folder, or a hub model that can be reached ({first})"
            ) from exc
        raise PyinvError(f"cannot load model {name!r}: {first}") from exc
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": scheduler_config,
        "image_size": None,
    }


def read_scheduler_config(source: str, local: bool) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a folder, or of a hub id (downloaded)."""
    if local:
        path = os.path.join(source, "scheduler", "scheduler_config.json")
        if not os.path.isfile(path):
            raise PyinvError(f"{source} has no scheduler/scheduler_config.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(source, "scheduler_config.json", subfolder="scheduler"), encoding="utf-8") as f:
        return json.load(f)


def save_model(model, folder: str) -> None:
    """Write a :class:`~pyinv.models.DiffusionModel` as a diffusers folder (unet/, vae/,
    text_encoder/, tokenizer/, scheduler/) that :func:`load_diffusers` reads back."""
    os.makedirs(folder, exist_ok=True)
    model.unet.save_pretrained(os.path.join(folder, "unet"))
    if model.vae is not None:
        model.vae.save_pretrained(os.path.join(folder, "vae"))
    model.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    model.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(model.scheduler_config, f, indent=2)
