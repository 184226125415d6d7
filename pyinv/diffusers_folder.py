"""Diffusers Stable Diffusion folders and hub ids: reading their components, writing a model.

A folder holds ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/scheduler_config.json``
and, for latent models, ``vae/`` (a pixel-space model has none). A Stable Diffusion XL folder
(``model_index.json``'s ``_class_name`` ``StableDiffusionXLPipeline``, or a ``text_encoder_2/``)
also holds ``text_encoder_2/`` (a ``CLIPTextModelWithProjection``) and ``tokenizer_2/``, and
its ``model_index.json`` says whether the pipeline encodes the empty prompt as zeros
(``force_zeros_for_empty_prompt``, true unless it says otherwise, as diffusers' pipeline).
:func:`load_diffusers` returns the components as the dict a preset builder returns (``unet``,
``vae``, ``text_encoder``, ``tokenizer``, ``scheduler_config``, ``image_size``, and for SDXL
``text_encoder_2``, ``tokenizer_2``, ``force_zeros_for_empty_prompt``); both
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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    known = f" (presets: {', '.join(presets)})" if presets else ""
    path = os.path.expanduser(name)
    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or looks_like_path(name)):
        raise PyinvError(f"model folder not found: {name}{known}")
    if local and not os.path.isdir(os.path.join(path, "unet")):
        raise PyinvError(f"{name} is not a diffusers Stable Diffusion folder (no unet/ inside)")
    source = path if local else name
    extra: dict[str, Any] = {}
    try:
        index = read_model_index(source, local)
        if is_sdxl(index, path if local else None):
            if "text_encoder" in index and _component(index, "text_encoder") is None:
                raise PyinvError(f"{name} has no first text encoder (an SDXL refiner?); pyinv runs SDXL base models")
            extra = {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"),
                "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
                "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
            }
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
        **extra,
    }


def load_vae(name: str):
    """An ``AutoencoderKL`` from a folder (its own ``config.json``, or a model folder's
    ``vae/``) or a hub id (at its root, else its ``vae`` subfolder), such as an fp16-fixed SDXL
    VAE (``madebyollin/sdxl-vae-fp16-fix``)."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(name)
    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or looks_like_path(name)):
        raise PyinvError(f"VAE folder not found: {name}")
    try:
        if local:
            if os.path.isfile(os.path.join(path, "config.json")):
                return AutoencoderKL.from_pretrained(path)
            if os.path.isfile(os.path.join(path, "vae", "config.json")):
                return AutoencoderKL.from_pretrained(path, subfolder="vae")
            raise PyinvError(f"{name} is not a diffusers VAE folder (no config.json, nor vae/config.json, inside)")
        try:
            return AutoencoderKL.from_pretrained(name)
        except OSError:
            return AutoencoderKL.from_pretrained(name, subfolder="vae")
    except PyinvError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PyinvError(f"cannot load VAE {name!r}: {first}") from exc


def check_vae(vae, unet, own_vae) -> None:
    """Refuse a VAE that cannot stand in for the model's own: the model has none (pixel
    space), or its latent channels or downsampling differ from what the UNet and the model's
    VAE work at."""
    if own_vae is None:
        raise PyinvError("this model works on pixels and has no VAE to replace")
    channels = int(vae.config.latent_channels)
    if channels != int(unet.config.in_channels):
        raise PyinvError(f"the VAE makes {channels}-channel latents but the UNet takes {unet.config.in_channels}")
    levels, own = len(vae.config.block_out_channels), len(own_vae.config.block_out_channels)
    if levels != own:
        raise PyinvError(
            f"the VAE downsamples {2 ** (levels - 1)}× but the model's own VAE {2 ** (own - 1)}×: "
            "it is not a VAE for this model"
        )


def read_model_index(source: str, local: bool) -> dict[str, Any]:
    """``model_index.json`` of a folder or hub id (``{}`` when a folder has none: pyinv's own
    SD folders do not write one)."""
    if local:
        path = os.path.join(source, "model_index.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(source, "model_index.json"), encoding="utf-8") as f:
        return json.load(f)


def _component(index: dict[str, Any], key: str) -> Any:
    """The library and class a model index names for ``key`` (``None`` when none)."""
    entry = index.get(key)
    if isinstance(entry, (list, tuple)) and entry and entry[0] is not None:
        return entry
    return None


def is_sdxl(index: dict[str, Any], folder: str | None = None) -> bool:
    """Whether a model index (and the local ``folder``, if any) describe an SDXL pipeline."""
    if "StableDiffusionXL" in str(index.get("_class_name", "")):
        return True
    if _component(index, "text_encoder_2") is not None:
        return True
    return folder is not None and os.path.isdir(os.path.join(folder, "text_encoder_2"))


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
    text_encoder/, tokenizer/, scheduler/; for SDXL also text_encoder_2/, tokenizer_2/ and a
    model_index.json) that :func:`load_diffusers` reads back."""
    os.makedirs(folder, exist_ok=True)
    if getattr(model, "text_encoder_2", None) is not None:
        model.text_encoder_2.save_pretrained(os.path.join(folder, "text_encoder_2"))
        (model.tokenizer_2 or model.tokenizer).save_pretrained(os.path.join(folder, "tokenizer_2"))
        index = {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": bool(model.force_zeros_for_empty_prompt),
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "EulerDiscreteScheduler")],
        }
        with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    model.unet.save_pretrained(os.path.join(folder, "unet"))
    if model.vae is not None:
        model.vae.save_pretrained(os.path.join(folder, "vae"))
    model.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    model.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(model.scheduler_config, f, indent=2)
