"""What identifies a model for saved inversions, and when two identities are the same model.

A fingerprint is a JSON-able dict::

    {"name": str, "config_sha256": str, "weight_sample": [16 floats]}

``config_sha256`` hashes the UNet, VAE and text-encoder configs that define the
architecture (plus the prediction type; for SDXL also the second text encoder's config and
whether the empty prompt is encoded as zeros — SD 1.x/2.x hashes are as before);
``weight_sample`` holds the first 16 values of the UNet's first convolution. Two
fingerprints match when the hashes are equal and the samples agree within ``rtol = 1e-2,
atol = 1e-3`` (so fp32, fp16 and bf16 loads of one checkpoint match and other checkpoints
of the same architecture do not).

This module sits below both :mod:`pyinv.models` (which computes a model's fingerprint) and
the inversion record (which compares the one in a file with the loaded model's).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from typing import Any

import torch

#: text-encoder settings that define the architecture (saving a model adds bookkeeping keys)
TEXT_ENCODER_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "projection_dim",
)

#: how many UNet ``conv_in`` weights the fingerprint samples
WEIGHT_SAMPLE = 16


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def fingerprint_of(model) -> dict[str, Any]:
    """The fingerprint of a :class:`~pyinv.models.DiffusionModel` (its ``name``, ``unet``,
    ``vae``, ``text_encoder``, ``text_encoder_2`` and ``prediction_type``). Reads a weight sample back from the
    model's device: call it once per model (``DiffusionModel.fingerprint`` caches it)."""
    configs = {
        "unet": dict(model.unet.config),
        "vae": dict(model.vae.config) if model.vae is not None else None,
        "text_encoder": {k: getattr(model.text_encoder.config, k, None) for k in TEXT_ENCODER_KEYS},
        "prediction_type": model.prediction_type,
    }
    second = getattr(model, "text_encoder_2", None)
    if second is not None:  # only SDXL models add keys: SD fingerprints keep their hashes
        configs["text_encoder_2"] = {k: getattr(second.config, k, None) for k in TEXT_ENCODER_KEYS}
        configs["force_zeros_for_empty_prompt"] = bool(getattr(model, "force_zeros_for_empty_prompt", False))
    blob = json.dumps(_jsonable(configs), sort_keys=True, default=str).encode()
    weight = model.unet.conv_in.weight.detach().flatten()[:WEIGHT_SAMPLE].float().cpu().tolist()
    return {
        "name": model.name,
        "config_sha256": hashlib.sha256(blob).hexdigest(),
        "weight_sample": weight,
    }


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two fingerprints describe the same model (see the module docstring).

    ``a`` may come from an untrusted file: a sample that is not a list of numbers, or of
    another length, simply does not match.
    """
    if a.get("config_sha256") != b.get("config_sha256"):
        return False
    wa, wb = a.get("weight_sample") or [], b.get("weight_sample") or []
    if not _numbers(wa) or not _numbers(wb) or len(wa) != len(wb):
        return False
    try:
        ta, tb = torch.tensor(wa, dtype=torch.float32), torch.tensor(wb, dtype=torch.float32)
    except OverflowError:  # an integer past any float
        return False
    return bool(torch.allclose(ta, tb, rtol=1e-2, atol=1e-3))
