"""The public Python API: :class:`Editor` (invert once, edit many times) and its results.

>>> editor = Editor.from_pretrained("tiny")
>>> inv = editor.invert("cat.png", "a photo of a cat", method="direct", steps=50)
>>> out = editor.edit(inv, ["a photo of a dog", "a photo of a fox"], guidance=7.5)
>>> out.images[0].save("dog.png")
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checks import check_guidance, check_seed, check_text
from .control.base import Controller
from .errors import PyinvError
from .imageio import center_crop_resize, load_image, pil_to_tensor, tensor_to_pil
from .inversion import Inversion, get_method
from .models import DiffusionModel, load_model
from .schedule import SCHEDULE_MODES, make_schedule
from .seeding import seeded

ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class EditResult:
    """What :meth:`Editor.edit` returns.

    Attributes:
        images: one PIL image per target prompt.
        latents: final target latents ``(T, C, h, w)``, float32.
        source_image / source_latents: the source branch's result, when it was run.
        unet_calls / unet_image_forwards: UNet work of the edit (image-forwards = batch rows).
        batch_rows: the UNet batch layout, ``(branch, "uncond"|"cond")`` per row.
        seconds: wall time of the edit (sampling + decoding).
    """

    images: list[Image.Image]
    latents: torch.Tensor
    prompts: list[str]
    source_image: Image.Image | None = None
    source_latents: torch.Tensor | None = None
    unet_calls: int = 0
    unet_image_forwards: int = 0
    batch_rows: tuple[tuple[int, str], ...] = ()
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditSpec:
    """One edit of :meth:`Editor.edit_many`: the arguments of :meth:`Editor.edit`
    (``options``: the method-specific edit options)."""

    inversion: Inversion | str | os.PathLike
    target: str | Sequence[str]
    guidance: float | None = None
    control: Controller | str | None = None
    with_source: bool = False
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _edit_spec(value: Any) -> EditSpec:
    if not isinstance(value, dict):
        raise PyinvError(f"each edit must be an EditSpec or a dict of its fields, got {type(value).__name__}")
    known = {f for f in EditSpec.__dataclass_fields__}
    unknown = sorted(set(value) - known)
    if unknown:
        raise PyinvError(f"unknown edit field(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
    if "inversion" not in value or "target" not in value:
        raise PyinvError("each edit needs an inversion and a target")
    return EditSpec(**value)


def _check_prompt(prompt: Any, what: str, allow_empty: bool = False) -> str:
    check_text(prompt, what)
    if not prompt.strip() and not allow_empty:
        raise PyinvError(f"{what} is empty")
    return prompt


def _prompts(value: Any, what: str = "target prompt") -> list[str]:
    """One prompt or a sequence of them, as a checked, non-empty list."""
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, Sequence):
        prompts = list(value)
    else:
        raise PyinvError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    if not prompts:
        raise PyinvError(f"no {what} given")
    for k, prompt in enumerate(prompts):
        _check_prompt(prompt, what if len(prompts) == 1 else f"{what} {k + 1}")
    return prompts


def _targets(target: str | Sequence[str]) -> list[str]:
    """The target prompts as a checked, non-empty list."""
    return _prompts(target, "target prompt")


#: an output whose every pixel lies within this range of one saturated colour (one 8-bit level) is blank
FLAT = 1.0 / 127.5


def _controller(control: Any) -> Controller | None:
    """``control`` as a controller: a :class:`Controller`, ``None``/``"none"`` (prompt swap),
    or a name in :data:`pyinv.control.CONTROL_NAMES` (that controller with its defaults)."""
    from .control.registry import KINDS, choices

    if isinstance(control, str):
        name = control.strip().lower()
        if name not in KINDS:
            raise PyinvError(f"unknown control {control!r}; use one of {choices()} or a Controller")
        control = KINDS[name].build()
    if control is not None and not isinstance(control, Controller):
        raise PyinvError(
            f"control must be a Controller (P2P(...), MasaCtrl(...), PnP(...)), a name "
            f"({choices()}) or None, got {type(control).__name__}"
        )
    return control  # a method that takes none (EDICT) refuses it with its own message


def _check_pixels(pixels: torch.Tensor, what: str, guidance: float, blank: bool = True) -> None:
    """Refuse a decoded output ``(B, 3, H, W)`` in ``[-1, 1]`` that is non-finite or (with
    ``blank``) blown out to nothing: one flat colour whose every channel is saturated (black,
    white, pure red, …), what a huge guidance scale gives. An error, never an image file."""
    hint = f" (guidance {guidance:g}; try a smaller one)"
    if not torch.isfinite(pixels).all():
        raise PyinvError(f"{what} produced non-finite values (NaN or infinity){hint}")
    if not blank:
        return
    flat = pixels.flatten(2)
    spread = (flat.amax(2) - flat.amin(2)).amax(1)
    saturated = (flat.abs() >= 1.0 - FLAT).flatten(1).all(1)
    if bool(((spread <= FLAT) & saturated).any()):
        raise PyinvError(f"{what} produced a blank image (every pixel the same saturated colour){hint}")


class Editor:
    """Inverts images into a diffusion model and edits them with text.

    One model, loaded once; :meth:`invert` returns an :class:`Inversion` that
    :meth:`edit` can use any number of times, with one or several target prompts.
    """

    def __init__(self, model: DiffusionModel, progress: bool = False):
        self.model = model
        self.progress = progress

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "tiny",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = False,
        backend: str | None = None,
        vae: str | None = None,
    ) -> Editor:
        """Load a preset (``tiny``, ``sd15-arch``, …), a diffusers folder or a hub id; its UNet
        runs on ``backend`` (``"eager"``, the default, or ``"compile"``: :mod:`pyinv.backends`).
        ``vae``: a VAE folder or hub id in place of the model's own (an fp16-fixed SDXL VAE)."""
        return cls(load_model(name_or_path, device=device, dtype=dtype, backend=backend, vae=vae), progress=progress)

    # ------------------------------------------------------------------ images
    def prepare_image(self, image: ImageInput) -> torch.Tensor:
        """``(1, 3, S, S)`` in [-1, 1]: loaded, converted to RGB, centre-cropped, resized."""
        return pil_to_tensor(center_crop_resize(load_image(image), self.model.image_size))

    def encode(self, image: ImageInput) -> torch.Tensor:
        """Latents ``z0 (1, C, h, w)`` of an image."""
        return self.model.encode_image(self.prepare_image(image))

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_pil(self.model.decode(latents))

    def _decode_checked(
        self, latents: torch.Tensor, what: str, guidance: float, blank: bool = True
    ) -> list[Image.Image]:
        """:meth:`decode`, refusing non-finite or blank results (see :func:`_check_pixels`)."""
        if not torch.isfinite(latents).all():
            raise PyinvError(f"{what} produced non-finite values (NaN or infinity) (guidance {guidance:g})")
        pixels = self.model.decode(latents)
        _check_pixels(pixels, what, guidance, blank)
        return tensor_to_pil(pixels)

    def check_prompts(self, source_prompt: str | None = None, targets: Sequence[str] = ()) -> None:
        """Raise a :class:`PyinvError` when a prompt has more tokens than the model reads
        (it would be cut off silently, and words past the limit could not be edited)."""
        if source_prompt:
            self.model.check_prompt_length(source_prompt, "source prompt")
        for k, prompt in enumerate(targets):
            self.model.check_prompt_length(prompt, "target prompt" if len(targets) == 1 else f"target prompt {k + 1}")

    # ------------------------------------------------------------------ invert
    def invert(
        self,
        image: ImageInput,
        source_prompt: str = "",
        method: str = "direct",
        steps: int | None = None,
        guidance: float | None = None,
        schedule: str | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> Inversion:
        """Invert ``image`` described by ``source_prompt`` with ``method``.

        ``steps``/``guidance``/``schedule`` default to the method's reference values;
        ``guidance`` is the w the inversion is made for (NTI, PTI, Direct Inversion's
        offsets; EF-DDPM's cfg_src). ``options`` are method-specific (``form=`` for
        Direct Inversion, ``inner_steps=`` for NTI/PTI, …). ``seed`` seeds random draws.
        """
        return self._invert(lambda: self.encode(image), source_prompt, method, steps, guidance, schedule, seed, options)

    def invert_latents(
        self,
        z0: torch.Tensor,
        source_prompt: str = "",
        method: str = "direct",
        steps: int | None = None,
        guidance: float | None = None,
        schedule: str | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> Inversion:
        """:meth:`invert` from latents ``z0 (1, C, h, w)`` already encoded with :meth:`encode`
        (the benchmark times the stages separately)."""
        return self._invert(
            lambda: self._check_latents(z0), source_prompt, method, steps, guidance, schedule, seed, options
        )

    def _check_latents(self, z0: Any) -> torch.Tensor:
        """``z0`` when it is a finite floating tensor ``(1, C, h, w)`` of this model's latent shape."""
        m = self.model
        shape = (1, m.latent_channels, m.latent_size, m.latent_size)
        if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
            raise PyinvError(f"latents must be a floating-point tensor {shape}, got {type(z0).__name__}")
        if tuple(z0.shape) != shape:
            raise PyinvError(f"latents must have shape {shape} for model {m.name!r}, got {tuple(z0.shape)}")
        if not bool(torch.isfinite(z0).all()):
            raise PyinvError("latents hold non-finite values (NaN or infinity)")
        return z0

    def invert_many(
        self,
        images: Sequence[ImageInput],
        source_prompts: Sequence[str],
        method: str = "direct",
        steps: int | None = None,
        guidance: float | None = None,
        schedule: str | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> list[Inversion]:
        """:meth:`invert` of several images (one source prompt each) with one method and
        settings: one :class:`Inversion` per image, in order, each as :meth:`invert` gives it.

        For the methods whose inversion is the DDIM pivot alone (``ddim``, ``direct``,
        ``negative-prompt``) the images' inversions share each step's UNet call (N calls for
        all of them; equal to separate inversions within 1e-12 in float64); the others
        invert one image after the other. Every argument is checked before any work.
        """
        if isinstance(source_prompts, str):
            raise PyinvError("source_prompts must be a list of prompts, one per image")
        if len(images) != len(source_prompts):
            raise PyinvError(
                f"{len(images)} images but {len(source_prompts)} source prompts: give one prompt per image"
            )
        if not images:
            return []
        checked = [self._invert_args(p, method, steps, guidance, schedule, seed, options) for p in source_prompts]
        algo, steps, guidance, mode, seed = checked[0]
        if not algo.pivot_only:  # one after the other, each with its own seeded draws
            return [
                self._invert(lambda im=im: self.encode(im), p, method, steps, guidance, schedule, seed, options)
                for im, p in zip(images, source_prompts, strict=True)
            ]
        z0s = [self.encode(image) for image in images]
        with seeded(seed):
            return algo.invert_many(
                self.model, z0s, list(source_prompts), steps, guidance, mode, self.progress, **options
            )

    def _invert(self, latents, source_prompt, method, steps, guidance, schedule, seed, options) -> Inversion:
        """Check the arguments, then get ``z0 = latents()`` and invert it."""
        algo, steps, guidance, mode, seed = self._invert_args(
            source_prompt, method, steps, guidance, schedule, seed, options
        )
        z0 = latents()
        with seeded(seed):
            return algo.invert(self.model, z0, source_prompt, steps, guidance, mode, self.progress, **options)

    def _invert_args(self, source_prompt, method, steps, guidance, schedule, seed, options):
        """An inversion's arguments checked before any work: ``(method, steps, guidance, schedule mode, seed)``."""
        algo = get_method(method)
        _check_prompt(source_prompt, "source prompt", allow_empty=not algo.needs_source_prompt)
        self.check_prompts(source_prompt)
        seed = None if seed is None else check_seed(seed)
        steps = algo.steps_for(self.model) if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise PyinvError(f"steps must be a positive integer, got {steps!r}")
        if guidance is None:  # a method may invert at another guidance than it edits with (EF-DDPM)
            guidance = algo.inversion_guidance_for(self.model)
        guidance = check_guidance(algo.guidance_for(self.model) if guidance is None else guidance)
        mode = schedule or algo.default_schedule
        if mode not in SCHEDULE_MODES:
            raise PyinvError(f"unknown schedule {mode!r}; use one of {', '.join(SCHEDULE_MODES)}")
        algo.invert_options_of(options)  # unknown names and bad values, before any work
        try:  # cheap, and says when the steps do not fit the spacing (1000 steps at offset 1)
            make_schedule(self.model.scheduler_config, steps, mode)
        except ValueError as exc:
            raise PyinvError(str(exc)) from None
        return algo, steps, guidance, mode, seed

    # ------------------------------------------------------------------ edit
    def edit(
        self,
        inversion: Inversion | str | os.PathLike,
        target: str | Sequence[str],
        guidance: float | None = None,
        control: Controller | None = None,
        with_source: bool = False,
        seed: int | None = None,
        **options: Any,
    ) -> EditResult:
        """Edit an inverted image towards ``target`` (one prompt or a list, one batch).

        ``control`` is an attention controller (``None`` = prompt swap). ``with_source``
        also runs and returns the source branch (the reconstruction). ``options`` are
        method-specific edit options (``eta=`` for PTI, ``skip=`` for EF-DDPM, …).
        """
        return self._edit(inversion, _targets(target), guidance, control, with_source, seed, **options)

    def edit_many(self, edits: Sequence[EditSpec | dict[str, Any]]) -> list[EditResult]:
        """Several edits — of one inversion or of different ones — run together: one result
        per edit, in order, each as :meth:`edit` would give it.

        Edits that run the same timesteps (same step count and schedule) go step by step
        together, and at each step those whose controls can share one UNet call — no control,
        or the same controller settings (P2P, MasaCtrl, PnP; LocalBlend included) — are one
        call of their batches concatenated, with the control applied row by row
        (:func:`pyinv.loop.run_shared`). EDICT edits, which run their own loop, run alone.
        Results equal separate edits up to the rounding that depends on the batch a row is
        in. Each edit is given as an :class:`EditSpec` or a dict of its fields; every edit
        is checked before any work. ``seconds`` is the wall time of the whole call.
        """
        specs = [spec if isinstance(spec, EditSpec) else _edit_spec(spec) for spec in edits]
        started = time.perf_counter()
        checked = []
        for spec in specs:
            inv = spec.inversion
            inv = self.load_inversion(inv) if not isinstance(inv, Inversion) else inv
            targets = _targets(spec.target)
            args = self._checked(inv, targets, spec.guidance, spec.control, spec.seed, spec.options)
            checked.append((inv, targets, *args))
        jobs, outputs = {}, {}
        for k, (inv, targets, algo, guidance, control, seed) in enumerate(checked):
            spec = specs[k]
            with seeded(seed):
                if algo.shares_calls:
                    job = algo.edit_job(self.model, inv, targets, guidance, control, spec.with_source, **spec.options)
                    jobs[k] = (algo, job)
                else:
                    outputs[k] = algo.edit(
                        self.model, inv, targets, guidance, control, spec.with_source, self.progress, **spec.options
                    )
        from . import loop

        results = loop.run_shared(self.model, [job for _, job in jobs.values()], progress=self.progress)
        for (k, (algo, job)), result in zip(jobs.items(), results, strict=True):
            outputs[k] = algo.edit_output(job, result)
        finished = []
        for k, (_, targets, _, guidance, *_rest) in enumerate(checked):
            finished.append(self._edit_result(outputs[k], targets, guidance, started))
        seconds = time.perf_counter() - started
        for result in finished:
            result.seconds = seconds
        return finished

    def _edit(self, inversion, targets: list[str], guidance, control, with_source, seed, **options) -> EditResult:
        inv = self.load_inversion(inversion) if not isinstance(inversion, Inversion) else inversion
        started = time.perf_counter()
        out = self._edit_latents(inv, targets, guidance, control, with_source, seed, **options)
        w = get_method(inv.method).guidance_for(self.model) if guidance is None else float(guidance)  # checked above
        return self._edit_result(out, targets, w, started)

    def _edit_result(self, out, targets: list[str], w: float, started: float) -> EditResult:
        """Decode an edit's latents (``w``: its guidance, for the error message) into its result."""
        images = self._decode_checked(out.targets, "the edit", w) if len(out.targets) else []
        # a reconstruction may be as flat as its image; only a non-finite one is an error
        source = None
        if out.source is not None:
            source = self._decode_checked(out.source, "the reconstruction", w, blank=False)
        return EditResult(
            images=images,
            latents=out.targets,
            prompts=targets,
            source_image=source[0] if source else None,
            source_latents=out.source,
            unet_calls=out.unet_calls,
            unet_image_forwards=out.unet_image_forwards,
            batch_rows=out.batch_rows,
            seconds=time.perf_counter() - started,
        )

    def _edit_latents(self, inv: Inversion, targets, guidance, control, with_source, seed, **options):
        """The edit's latents (no decode): the method's :class:`~pyinv.inversion.base.EditOutput`."""
        algo, guidance, control, seed = self._checked(inv, targets, guidance, control, seed, options)
        with seeded(seed):
            return algo.edit(self.model, inv, targets, guidance, control, with_source, self.progress, **options)

    def _checked(self, inv: Inversion, targets, guidance, control, seed, options):
        """An edit's arguments checked before any work: ``(method, guidance, controller, seed)``."""
        inv.check_model(self.model)
        algo = get_method(inv.method)
        guidance = check_guidance(algo.guidance_for(self.model) if guidance is None else guidance)
        control = _controller(control)
        negative = getattr(control, "negative_prompt", None)  # PnP's, for the targets' unconditional pass
        if isinstance(negative, str) and negative:
            self.model.check_prompt_length(negative, "negative prompt")
        seed = None if seed is None else check_seed(seed)
        self.model.check_prompt_length(inv.source_prompt, "the inversion's source prompt")
        self.check_prompts(None, targets)
        algo.edit_options_of(options)  # unknown names and bad values, before any work
        return algo, guidance, control, seed

    def edit_latents(
        self,
        inversion: Inversion,
        target: str | Sequence[str],
        guidance: float | None = None,
        control: Controller | None = None,
        seed: int | None = None,
        **options: Any,
    ):
        """:meth:`edit` without decoding: the target latents ``(T, C, h, w)`` and the UNet
        counts as an ``EditOutput`` (the benchmark times the edit and the decode apart)."""
        inv = self.load_inversion(inversion) if not isinstance(inversion, Inversion) else inversion
        return self._edit_latents(inv, _targets(target), guidance, control, False, seed, **options)

    def reconstruct(self, inversion: Inversion, guidance: float | None = None, **options: Any) -> EditResult:
        """Run the source branch only: the method's reconstruction of the inverted image.

        Implemented as an edit with no target branch and the source branch on; the
        returned ``source_latents``/``source_image`` are the reconstruction (``images`` is empty).
        """
        return self._edit(inversion, [], guidance, None, True, None, **options)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompt: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        steps: int = 50,
        guidance: float = 7.5,
        negative_prompt: str = "",
    ) -> list[Image.Image]:
        """Sample images from text (DDIM, classifier-free guidance): one per prompt.

        ``seed`` is one seed for every prompt or one per prompt; an image depends only on
        its prompt and seed (see :mod:`pyinv.generate`). Useful to make source images.
        """
        from .generate import sample

        prompts = _prompts(prompt, "prompt")
        seeds = list(seed) if isinstance(seed, Sequence) and not isinstance(seed, str) else [seed] * len(prompts)
        seeds = [check_seed(s, "seed" if len(seeds) == 1 else f"seed {k + 1}") for k, s in enumerate(seeds)]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise PyinvError(f"steps must be a positive integer, got {steps!r}")
        _check_prompt(negative_prompt, "negative prompt", allow_empty=True)
        self.check_prompts(None, prompts)
        if negative_prompt:
            self.model.check_prompt_length(negative_prompt, "negative prompt")
        guidance = check_guidance(guidance)
        latents = sample(self.model, prompts, seeds, steps, guidance, negative_prompt, progress=self.progress)
        return self._decode_checked(latents, "sampling", guidance)

    # ------------------------------------------------------------------ files
    def load_inversion(self, path: str | os.PathLike) -> Inversion:
        """Load an inversion file made with this editor's model (else a clear error)."""
        return Inversion.load(path, model=self.model)
