"""Diffusion models: presets, diffusers folders and hub ids, behind one small interface.

A :class:`DiffusionModel` holds the UNet, the optional VAE (``None`` = pixel space), the
text encoder and tokenizer, and the scheduler config. Latents are kept in float32 by the
algorithms (float64 for a float64 model, used to check numerics); the model casts to its
own dtype at each call and returns :attr:`DiffusionModel.latent_dtype`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .backends import Backend, EagerBackend, get_backend
from .checks import check_text
from .control.attention import install_control
from .diffusers_folder import check_vae, load_diffusers, load_vae, save_model
from .errors import PyinvError
from .fingerprint import fingerprint_of, fingerprints_match
from .presets import PRESETS, SIZED_PRESETS
from .sdxl import AddedConditions, added_conditions, encode_sdxl, square_time_ids, unet_kwargs
from .text import tokenize

__all__ = [
    "DiffusionModel",
    "fingerprints_match",
    "load_model",
    "parse_device",
    "parse_dtype",
    "quiet_libraries",
    "save_model",
]

#: guards the lazily made float32 copies of a model's modules
_COPY_LOCK = threading.Lock()

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise PyinvError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise PyinvError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (N an existing GPU); ``None``/``auto``: CUDA when usable."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    match = _DEVICE.fullmatch(text)
    if not isinstance(device, str | torch.device) or match is None:
        raise PyinvError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    kind, index = match.groups()
    if kind == "cpu":
        if index not in (None, "0"):
            raise PyinvError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PyinvError(f"device {device!r} was asked for but this torch has no usable CUDA")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise PyinvError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device(text)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the libraries' own log messages, progress bars and warnings for the block
    (e.g. diffusers' "accelerate was not found" notice and transformers' "Loading weights" bar
    while a model loads): pyinv reports for itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hub_logger = logging.getLogger("huggingface_hub")
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(), hub_logger.level
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    hub_logger.setLevel(logging.ERROR)  # e.g. its retry notices while the hub is unreachable
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        hub_logger.setLevel(levels[2])


@dataclass
class DiffusionModel:
    """A text-to-image diffusion model on one device and dtype.

    Shapes: prompt embeddings ``(B, L, D)`` (L = 77 for CLIP), latents ``(B, C, h, w)``,
    images ``(B, 3, H, W)`` in ``[-1, 1]``.

    An SDXL model has a second text encoder and tokenizer (``text_encoder_2``,
    ``tokenizer_2``; ``None`` for SD 1.x/2.x) and its embeddings are ``(B, L + 1, D1 + D2)``:
    the pooled text embedding packed as one extra row (:mod:`pyinv.sdxl`), split back at
    every UNet call (:attr:`added_conditions`). ``force_zeros_for_empty_prompt`` (SDXL base's
    pipeline setting): the empty prompt is encoded as zeros, as the pipeline's unconditional
    pass is, so every method's null text matches it.
    """

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    image_size: int
    unet_calls: int = 0
    unet_image_forwards: int = 0
    backend: Backend = field(default_factory=EagerBackend)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    _fp32_copies: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    _fingerprint: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    #: derived in __post_init__ (an init field only so that copies of a model can be made
    #: from ``vars(model)`` or ``dataclasses.replace``)
    _added: AddedConditions | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.backend.check(self.device, self.dtype)
        width = int(self.text_encoder.config.hidden_size)
        if self.text_encoder_2 is not None:
            width += int(self.text_encoder_2.config.hidden_size)
        self._added = added_conditions(self.unet, self.text_encoder_2, self.max_tokens, width, self.image_size)
        self.backend.check_model(self)
        # the stateless control processors and hooks, once per UNet (pyinv.control.attention)
        install_control(self.unet)

    # ------------------------------------------------------------------ properties
    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def traced_unet(self) -> bool:
        """The UNet runs traced (the ``compile`` backend, or a ``torch.compile`` wrapper): a
        controlled edit then applies its control at every step, so that one graph serves all of
        them (``Controller.graph_static``)."""
        return self.backend.traced or hasattr(self.unet, "_orig_mod")

    @property
    def added_conditions(self) -> AddedConditions | None:
        """SDXL's added conditions and how the embeddings pack them (``None`` for SD 1.x/2.x).
        Their time ids follow :attr:`image_size` (set anew when it has changed)."""
        added = self._added
        if added is not None and added.time_ids != square_time_ids(self.image_size):
            added = self._added = added.for_size(self.image_size)
        return added

    @property
    def family(self) -> str:
        """``"SDXL"`` for a model with SDXL's added conditions, else ``"SD"``."""
        return "SD" if self._added is None else "SDXL"

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """``(length, width)`` of one prompt's embeddings: ``(L, D)``, or ``(L + 1, D1 + D2)``
        for SDXL (the pooled row, :mod:`pyinv.sdxl`)."""
        width = int(self.text_encoder.config.hidden_size)
        if self.text_encoder_2 is not None:
            width += int(self.text_encoder_2.config.hidden_size)
        return self.max_tokens + (0 if self._added is None else 1), width

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype latents, embeddings and step math use: float32 (float64 for fp64 models)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215)) if self.vae is not None else 1.0

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states of ``prompts`` padded to the tokenizer's max length, fp32.

        SDXL: the packed ``(B, L + 1, D1 + D2)`` embeddings of :func:`pyinv.sdxl.encode_sdxl`;
        with ``force_zeros_for_empty_prompt`` the empty prompt ``""`` gives zeros (hidden
        states and pooled row), as diffusers' SDXL pipeline's unconditional pass does."""
        prompts = list(prompts)
        ids = self._token_ids(self.tokenizer, prompts)
        if self._added is None:
            return self.text_encoder(ids)[0].to(self.latent_dtype)
        ids_2 = self._token_ids(self.tokenizer_2 or self.tokenizer, prompts)
        packed = encode_sdxl(ids, ids_2, self.text_encoder, self.text_encoder_2, self.latent_dtype)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=packed.device)
            packed = torch.where(empty[:, None, None], torch.zeros_like(packed), packed)
        return packed

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenize(
            tokenizer,
            prompts,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @property
    def max_tokens(self) -> int:
        """Padded prompt length: the tokenizer's limit, capped by the text encoder's positions."""
        limit = int(getattr(self.text_encoder.config, "max_position_embeddings", 77))
        return min(int(self.tokenizer.model_max_length), limit)

    def token_count(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` without the start/end tokens."""
        return len(tokenize(self.tokenizer, prompt, verbose=False).input_ids) - 2

    def check_prompt_length(self, prompt: str, what: str = "prompt") -> str:
        """``prompt``, or a :class:`PyinvError` when it has more tokens than the text encoder
        reads (the rest would be cut off, and words there could not be edited)."""
        room = self.max_tokens - 2  # the start and end tokens
        count = self.token_count(check_text(prompt, what))
        if count > room:
            raise PyinvError(
                f"{what} is {count} tokens long but model {self.name!r} reads at most {room}; "
                "shorten it (the rest would be cut off)"
            )
        return prompt

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``z = vae.encode(x).latent_dist.mean · scaling_factor`` (pixels as-is without a VAE)."""
        image = image.to(self.device)
        if self.vae is None:
            return image.to(self.latent_dtype)
        dist = self.vae.encode(image.to(self.vae.dtype)).latent_dist
        return dist.mean.to(self.latent_dtype) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` from latents; a fp16 decode that overflows is redone in fp32."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        scaled = latents / self.scaling_factor
        image = self.vae.decode(scaled.to(self.vae.dtype)).sample
        if not torch.isfinite(image).all() and self.vae.dtype != torch.float32:
            image = self.fp32_copy("vae").decode(scaled.float()).sample
        return image.float().clamp(-1, 1)

    # ------------------------------------------------------------------ unet
    def unet_forward(self, latents: torch.Tensor, t: int, embeddings: torch.Tensor) -> torch.Tensor:
        """One batched UNet call: ``(R, C, h, w)`` latents at timestep ``t`` with ``(R, L, D)``
        embeddings → float32 model output ``(R, C, h, w)``. Counts calls and image-forwards."""
        return self.unet_forward_controlled(latents, t, embeddings, None)[0]

    def unet_forward_controlled(
        self, latents: torch.Tensor, t: int, embeddings: torch.Tensor, control
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`unet_forward` under ``control`` (a :class:`~pyinv.control.base.StepControl`
        or ``None``): the model output and the word maps ``(1 + T, n)`` the call gathered
        (``None`` when it gathered none). The call runs on the model's backend
        (:meth:`pyinv.backends.Backend.run`); the control goes in with the call, so concurrent
        calls on one model do not meet."""
        self.unet_calls += 1
        self.unet_image_forwards += latents.shape[0]
        sample, text = latents.to(self.dtype), embeddings.to(self.dtype)
        out, maps = self.backend.run(self, sample, _timestep(t, latents.device), text, control)
        return out.to(self.latent_dtype), maps

    def fp32_unet(self) -> torch.nn.Module:
        """The UNet in float32 (a cached copy when the model runs in half precision).

        NTI and PTI optimise embeddings through the UNet; the reference runs that in fp32.
        """
        if self.dtype in (torch.float32, torch.float64):
            return self.unet
        return self.fp32_copy("unet")

    def fp32_copy(self, part: str) -> torch.nn.Module:
        """A float32 copy of ``part`` (``"unet"`` or ``"vae"``), made once, when first asked for;
        the model's own modules are never converted in place, so concurrent calls never see a
        module change dtype under them."""
        with _COPY_LOCK:
            copies = self._fp32_copies
            if part not in copies:
                import copy

                copies[part] = copy.deepcopy(getattr(self, part)).float()
            return copies[part]

    def unet_forward_grad(self, latents: torch.Tensor, t: int, embeddings: torch.Tensor) -> torch.Tensor:
        """UNet call in fp32 with autograd enabled (for embedding optimisation)."""
        self.unet_calls += 1
        self.unet_image_forwards += latents.shape[0]
        unet = self.fp32_unet()
        dt = self.latent_dtype
        t = _timestep(t, latents.device)
        return unet(latents.to(dt), t, **unet_kwargs(embeddings.to(dt), self.added_conditions), return_dict=False)[
            0
        ].to(dt)

    def reset_counters(self) -> None:
        self.unet_calls = 0
        self.unet_image_forwards = 0

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """What identifies this model for saved inversions (see :mod:`pyinv.fingerprint`):
        configs hash + a weight sample.

        Computed once per model: reading the weight sample back from the device would
        otherwise synchronise every edit that checks its inversion against the model. The
        weights do not change in place after loading, so nothing invalidates it. Returns a
        copy (a record that keeps it may be changed without touching the model's).
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self)
        return {**self._fingerprint, "weight_sample": list(self._fingerprint["weight_sample"])}


def _timestep(t, device: torch.device) -> torch.Tensor:
    """The timestep as a 0-d tensor: the UNet embeds it exactly as it would the number, and a
    compiled UNet (``torch.compile``) treats it as an input instead of recompiling per step."""
    if isinstance(t, torch.Tensor):
        return t.to(device)
    return torch.tensor(t, dtype=torch.float64 if isinstance(t, float) else torch.int64, device=device)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    image_size: int | None = None,
    backend: str | Backend | None = None,
    vae: str | None = None,
) -> DiffusionModel:
    """Load a preset (``demo``, ``tiny``, ``tiny-v``, ``tiny-pixel``, ``tiny-xl``, ``sd15-arch``,
    ``sdxl-arch``), a local diffusers Stable Diffusion (1.x, 2.x or XL) folder, or a hub id (downloaded by
    diffusers, cached as usual), to run its UNet on ``backend`` (:mod:`pyinv.backends`;
    default ``eager``). ``vae``: a VAE folder or hub id to use in place of the model's own
    (:func:`pyinv.diffusers_folder.load_vae`; an fp16-fixed SDXL VAE, for instance)."""
    runs_on = get_backend(backend)
    dev = parse_device(device)
    dt = parse_dtype(dtype)
    runs_on.check(dev, dt)  # before any weights load: a backend that cannot run says so first
    if not name_or_path or not str(name_or_path).strip():
        raise PyinvError("empty model name")
    name = str(name_or_path)
    with quiet_libraries():
        if name in SIZED_PRESETS:
            parts = PRESETS[name](dtype=dt, device=dev)
        else:
            parts = PRESETS[name]() if name in PRESETS else load_diffusers(name, tuple(PRESETS))
        if vae is not None:
            replacement = load_vae(str(vae))
            check_vae(replacement, parts["unet"], parts["vae"])
            parts["vae"] = replacement
        unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        text_encoder_2 = parts.get("text_encoder_2")
        encoders = (text_encoder, text_encoder_2)
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is not None:
                # fp64 (numerics checks) keeps the text encoders in fp32: some transformers
                # releases cannot build CLIP's attention mask in fp64; embeddings are upcast.
                module_dtype = torch.float32 if (any(module is e for e in encoders) and dt == torch.float64) else dt
                module.to(device=dev, dtype=module_dtype).eval().requires_grad_(False)
    tokenizer, tokenizer_2 = parts["tokenizer"], parts.get("tokenizer_2")
    # pyinv checks prompt lengths itself (check_prompt_length); the tokenizer's own
    # "sequence length is longer than …" log line would only repeat it, unasked
    for tok in (tokenizer, tokenizer_2):
        with contextlib.suppress(AttributeError, TypeError):
            tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    size = image_size or parts.get("image_size") or _default_image_size(unet, vae)
    return DiffusionModel(
        name=name,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(parts["scheduler_config"]),
        device=dev,
        dtype=dt,
        image_size=int(size),
        backend=runs_on,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=bool(parts.get("force_zeros_for_empty_prompt", False)),
    )


def _default_image_size(unet, vae) -> int:
    factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * factor
