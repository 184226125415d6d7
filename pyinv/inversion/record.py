"""The :class:`Inversion` value object: what inverting one image produced.

It holds the method, the model's fingerprint, the source prompt, the schedule, and the
method's tensors (pivot trajectory, per-step embeddings, offsets, noise maps, …). It is
saved as one safetensors file whose header metadata carries the JSON description, so
one image can be inverted once and edited many times, in this process or a later one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PyinvError

FORMAT_NAME = "pyinv.inversion"
FORMAT_VERSION = 1


@dataclass
class Inversion:
    """An inverted image, ready to edit.

    Attributes:
        method: registry name of the inversion method (``"direct"``, ``"null-text"``, …).
        model: the fingerprint of the model it was made with (see ``DiffusionModel.fingerprint``).
        source_prompt: the prompt the image was inverted with ("" allowed for PTI / EF-DDPM).
        num_steps: inference steps N.
        guidance: the guidance the inversion was made for (NTI/PTI/Direct: w; EF-DDPM: cfg_src).
        schedule: schedule metadata (timesteps, spacing mode, prediction type).
        image_size: pixel size of the (square) image the model saw.
        tensors: named tensors; every method stores ``z0`` ``(1, C, h, w)``; others by method:
            ``trajectory (N+1, C, h, w)``, ``null_embeddings (N, L, D)``,
            ``cond_embeddings (N, L, D)``, ``offsets (N, C, h, w)``, ``xts (N+1, C, h, w)``,
            ``noise_maps (N, C, h, w)``, ``edict_x``/``edict_y (1, C, h, w)``.
        options: method options that editing needs (e.g. Direct Inversion's form).
        stats: what the inversion cost (UNet calls, image-forwards, seconds).
    """

    method: str
    model: dict[str, Any]
    source_prompt: str
    num_steps: int
    guidance: float
    schedule: dict[str, Any]
    image_size: int
    tensors: dict[str, torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def z0(self) -> torch.Tensor:
        return self.tensors["z0"]

    def to(self, device: torch.device | str) -> Inversion:
        """A copy with every tensor on ``device``."""
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        return Inversion(**{**self.__dict__, "tensors": moved})

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "method": self.method,
            "model": self.model,
            "source_prompt": self.source_prompt,
            "num_steps": self.num_steps,
            "guidance": self.guidance,
            "schedule": self.schedule,
            "image_size": self.image_size,
            "options": self.options,
            "stats": self.stats,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (safetensors; JSON description in the header), atomically."""
        from safetensors.torch import save_file

        from ..imageio import atomic_path

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        meta = {"pyinv": json.dumps(self.metadata())}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, device: str | torch.device = "cpu") -> Inversion:
        """Read an inversion file; with ``model``, refuse one made with another model."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PyinvError(f"inversion file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get("pyinv")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PyinvError(f"not a pyinv inversion file: {path} ({str(exc).splitlines()[0]})") from None
        if raw is None:
            raise PyinvError(f"not a pyinv inversion file (no pyinv metadata): {path}")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise PyinvError(f"inversion file has damaged metadata: {path}") from None
        if meta.get("format") != FORMAT_NAME:
            raise PyinvError(f"not a pyinv inversion file: {path}")
        try:
            version = int(meta.get("format_version", 0))
        except (TypeError, ValueError):
            raise PyinvError(f"inversion file has a bad format version: {path}") from None
        if version > FORMAT_VERSION:
            raise PyinvError(
                f"inversion file {path} has format version {version}, newer than this pyinv reads "
                f"({FORMAT_VERSION}); upgrade pyinv"
            )
        try:
            inv = cls(
                method=str(meta["method"]),
                model=dict(meta["model"]),
                source_prompt=str(meta["source_prompt"]),
                num_steps=int(meta["num_steps"]),
                guidance=float(meta["guidance"]),
                schedule=dict(meta["schedule"]),
                image_size=int(meta["image_size"]),
                tensors={k: v.to(device) for k, v in tensors.items()},
                options=dict(meta.get("options", {})),
                stats=dict(meta.get("stats", {})),
                format_version=version,
            )
            _ = inv.schedule["timesteps"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PyinvError(f"inversion file has incomplete metadata ({exc}): {path}") from None
        inv.check_tensors(path)
        if model is not None:
            inv.check_model(model)
        return inv

    def check_tensors(self, label: str = "inversion") -> None:
        """Raise a clear error when a tensor the method needs for editing is missing."""
        from . import get_method

        needed = ("z0", *get_method(self.method).required_tensors(self))
        missing = [name for name in needed if name not in self.tensors]
        if missing:
            raise PyinvError(f"{label} lacks the tensor(s) {', '.join(missing)} that {self.method!r} edits need")

    def check_model(self, model) -> None:
        """Raise a clear error when this inversion was made with another model."""
        from ..models import fingerprints_match

        if not fingerprints_match(self.model, model.fingerprint()):
            raise PyinvError(
                f"this inversion was made with model {self.model.get('name')!r}, "
                f"not with the loaded model {model.name!r}; invert the image again with this model"
            )
