"""The :class:`Inversion` value object: what inverting one image produced.

It holds the method, the model's fingerprint, the source prompt, the schedule, and the
method's tensors (pivot trajectory, per-step embeddings, noise maps, …). It is
saved as one safetensors file whose header metadata carries the JSON description, so
one image can be inverted once and edited many times, in this process or a later one.

The record knows the file format and checks itself; what it needs to know of its method
(:class:`MethodFacts`) comes from the caller or from the registry (a leaf module), never
from the methods' package above it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import PyinvError
from ..fingerprint import fingerprints_match
from .registry import get_method

FORMAT_NAME = "pyinv.inversion"
FORMAT_VERSION = 1

#: the shape of each tensor an inversion may hold: N steps, latents (C, h, w), embeddings (L, D)
TENSOR_SHAPES: dict[str, tuple[str | int, ...]] = {
    "z0": (1, "C", "h", "w"),
    "trajectory": ("N+1", "C", "h", "w"),
    "xts": ("N+1", "C", "h", "w"),
    "offsets": ("N", "C", "h", "w"),
    "noise_maps": ("N", "C", "h", "w"),
    "null_embeddings": ("N", "L", "D"),
    "cond_embeddings": ("N", "L", "D"),
    "edict_x": (1, "C", "h", "w"),
    "edict_y": (1, "C", "h", "w"),
}


class MethodFacts(Protocol):
    """What checking a record needs to know of the method it names (a registered
    :class:`~pyinv.inversion.base.Method` provides it)."""

    @property
    def invert_options(self) -> Mapping[str, Any]:
        """The names of the options a record of this method may hold (→ defaults)."""
        ...

    def recorded_options(self, inv: Inversion) -> object:
        """The record's options, checked: a bad value raises a :class:`PyinvError`."""
        ...

    def required_tensors(self, inv: Inversion) -> tuple[str, ...]:
        """The tensors (besides ``z0``) an edit of this method reads."""
        ...


def _size(dim: str | int, sizes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    return sizes["N"] + 1 if dim == "N+1" else sizes.get(dim, -1)  # -1: no tensor gave it, so none fits


def _typed(value: Any, kind: type | tuple[type, ...], name: str, path: str) -> Any:
    """``value`` when it has JSON type ``kind`` (never a bool for a number), else a clear error."""
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise PyinvError(f"inversion file has a bad {name} in its metadata ({str(value)[:40]!r}): {path}")
    return value


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
            ``cond_embeddings (N, L, D)``, ``xts (N+1, C, h, w)``,
            ``noise_maps (N, C, h, w)``, ``edict_x``/``edict_y (1, C, h, w)``; ``offsets (N, C, h, w)``
            only in Direct Inversion files of older versions (loaded, not used).
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

    def file_contents(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What a file of this inversion holds: its tensors (on the CPU, contiguous) and the
        safetensors header metadata (``{"pyinv": <JSON description>}``)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return tensors, {"pyinv": json.dumps(self.metadata())}

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (safetensors; JSON description in the header), atomically."""
        from safetensors.torch import save_file

        from ..imageio import atomic_path

        tensors, meta = self.file_contents()
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, device: str | torch.device = "cpu") -> Inversion:
        """Read an inversion file; with ``model``, refuse one made with another model."""
        from safetensors import SafetensorError, safe_open

        if not isinstance(path, str | os.PathLike):
            raise PyinvError(f"an inversion is an Inversion or the path of its file, got {type(path).__name__}")
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
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
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
                method=_typed(meta["method"], str, "method", path),
                model=_typed(meta["model"], dict, "model", path),
                source_prompt=_typed(meta["source_prompt"], str, "source_prompt", path),
                num_steps=_typed(meta["num_steps"], int, "num_steps", path),
                guidance=float(_typed(meta["guidance"], (int, float), "guidance", path)),
                schedule=_typed(meta["schedule"], dict, "schedule", path),
                image_size=_typed(meta["image_size"], int, "image_size", path),
                tensors={k: v.to(device) for k, v in tensors.items()},
                options=_typed(meta.get("options", {}), dict, "options", path),
                stats=_typed(meta.get("stats", {}), dict, "stats", path),
                format_version=version,
            )
        except KeyError as exc:
            raise PyinvError(f"inversion file has incomplete metadata (no {exc}): {path}") from None
        inv.check_tensors(path)
        if model is not None:
            inv.check_model(model)
        return inv

    def check_tensors(self, label: str = "inversion", method: MethodFacts | None = None) -> None:
        """Raise a clear error unless the metadata and tensors are consistent and usable: a
        known method and its options, ``1 ≤ num_steps ≤`` the schedule's training steps with
        that many timesteps, finite guidance, and every tensor the method needs, with the
        shape :data:`TENSOR_SHAPES` gives, a floating dtype and only finite values.

        ``method``: the facts of the method the record names (default: the registered one).
        """
        from ..checks import check_guidance

        try:
            algo = method if method is not None else get_method(self.method)
        except PyinvError as exc:
            raise PyinvError(f"{label}: {exc}") from None
        unknown = sorted(set(self.options) - set(algo.invert_options))
        if unknown:
            raise PyinvError(f"{label}: method {self.method!r} has no option(s) {', '.join(unknown)}")
        try:
            algo.recorded_options(self)
            check_guidance(self.guidance, "guidance")
        except PyinvError as exc:
            raise PyinvError(f"{label}: {exc}") from None
        if self.image_size <= 0:
            raise PyinvError(f"{label}: image_size must be positive, got {self.image_size}")
        self._check_schedule(label)
        needed = ("z0", *algo.required_tensors(self))
        missing = [name for name in needed if name not in self.tensors]
        if missing:
            raise PyinvError(f"{label} lacks the tensor(s) {', '.join(missing)} that {self.method!r} edits need")
        z0 = self.tensors["z0"]
        if z0.dim() != 4 or z0.shape[0] != 1 or z0.shape[2] != z0.shape[3]:
            raise PyinvError(f"{label}: tensor z0 has shape {tuple(z0.shape)}, not (1, C, h, h)")
        _, c, h, w = z0.shape
        sizes = {"N": self.num_steps, "C": c, "h": h, "w": w}
        for name in ("null_embeddings", "cond_embeddings"):
            if name in self.tensors and self.tensors[name].dim() == 3:
                sizes.setdefault("L", self.tensors[name].shape[1])
                sizes.setdefault("D", self.tensors[name].shape[2])
        for name, tensor in self.tensors.items():
            if name not in TENSOR_SHAPES:
                raise PyinvError(f"{label} holds an unknown tensor {name!r}")
            expected = tuple(_size(d, sizes) for d in TENSOR_SHAPES[name])
            if tuple(tensor.shape) != expected:
                raise PyinvError(
                    f"{label}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected} "
                    f"for {self.num_steps} steps"
                )
            if not tensor.is_floating_point():
                raise PyinvError(f"{label}: tensor {name} has dtype {tensor.dtype}, not a floating-point type")
            if not bool(torch.isfinite(tensor).all()):
                raise PyinvError(f"{label}: tensor {name} holds non-finite values (NaN or infinity)")

    def _check_schedule(self, label: str) -> None:
        from ..schedule import SCHEDULE_MODES

        mode = self.schedule.get("mode", "reference")
        if not isinstance(mode, str) or mode not in SCHEDULE_MODES:
            raise PyinvError(f"{label}: unknown schedule spacing {str(mode)[:40]!r}")
        config = self.schedule.get("config")
        train = config.get("num_train_timesteps", 1000) if isinstance(config, dict) else 1000
        timesteps = self.schedule.get("timesteps")
        if not isinstance(train, int) or not 1 <= self.num_steps <= train:
            raise PyinvError(f"{label}: num_steps must be in [1, {train}], got {self.num_steps}")
        if (
            not isinstance(timesteps, list)
            or len(timesteps) != self.num_steps
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < train for t in timesteps)
        ):
            raise PyinvError(f"{label}: its schedule does not hold {self.num_steps} timesteps in [0, {train})")

    def check_model(self, model, method: MethodFacts | None = None) -> None:
        """Raise a clear error when this inversion was made with another model, or does not
        fit it, or fails :meth:`check_tensors` (``method`` as there).

        Uses the model's cached fingerprint: no device synchronisation per edit."""
        if not fingerprints_match(self.model, model.fingerprint()):
            raise PyinvError(
                f"this inversion was made with model {self.model.get('name')!r}, "
                f"not with the loaded model {model.name!r}; invert the image again with this model"
            )
        self.check_tensors(method=method)
        expected = {
            "image_size": (self.image_size, model.image_size),
            "latent channels": (self.z0.shape[1], model.latent_channels),
            "latent size": (self.z0.shape[2], model.latent_size),
        }
        length, width = model.embedding_shape  # SDXL: the pooled row and both encoders' width
        for name in ("null_embeddings", "cond_embeddings"):
            if name in self.tensors:
                expected[f"{name} length"] = (self.tensors[name].shape[1], length)
                expected[f"{name} width"] = (self.tensors[name].shape[2], width)
        for what, (have, want) in expected.items():
            if int(have) != int(want):
                raise PyinvError(f"this inversion does not fit model {model.name!r}: its {what} is {have}, not {want}")
