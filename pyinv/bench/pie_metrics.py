"""The metric models of PIE-Bench's evaluation: DINO structure distance, CLIP similarity, LPIPS.

PIE-Bench (PnP Inversion, arXiv 2310.01506) scores an edit ``E`` of a source image ``S``
(both ``512×512`` RGB, uint8) with an edit mask ``M`` (1 = region to edit) by

- structure distance (DINO ViT-B/8, Tumanyan et al. 2022): ``K (T, D)`` the keys of the
  last transformer layer (``T = 1 + 28²`` tokens with the CLS token, heads concatenated),
  ``A_ij = k_i·k_j / max(‖k_i‖‖k_j‖, 10⁻⁸)`` the key self-similarity, and
  ``d = mean_ij (A(E) − A(S))²``. The images are resized to 224 (shorter side, bilinear,
  no antialiasing: the reference's torchvision tensor ``Resize``) and normalised with the
  ImageNet mean and std *applied to pixel values in [0, 255]*, exactly as the reference
  does (it never divides by 255; its published numbers depend on that);
- background preservation on the unedited part, both images multiplied by ``1 − M``,
  pixels in ``[0, 1]``: PSNR, MSE, SSIM (:mod:`pyinv.bench.metrics`) and LPIPS (SqueezeNet,
  inputs scaled to ``[−1, 1]``); undefined (``nan``) when the mask covers everything;
- CLIP similarity (ViT-L/14) with the target prompt, ``max(100·cos(f_img, f_txt), 0)``
  as torchmetrics' ``CLIPScore`` computes it: of the whole edit and of the edited part
  ``uint8(E ⊙ M)``. Texts longer than the model's positions are cut (as CLIPScore does).

Every metric model is optional: one that cannot be built (a missing folder, no network
for a hub id, torchvision missing for LPIPS, or turned off with ``"none"``) makes its
metric *unavailable* with a reason; it is never scored as a number.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import masked_mse, masked_psnr, masked_ssim

#: the reference's metric models
DEFAULT_DINO = "facebook/dino-vitb8"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_LPIPS = "squeeze"
LPIPS_NETS = ("squeeze", "alex", "vgg")
#: what turns a metric model off
OFF = "none"

#: per-image metrics, in the reference's order
METRICS = ("structure", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
#: which metric model each metric needs
NEEDS = {"structure": "dino", "lpips": "lpips", "clip_whole": "clip", "clip_edited": "clip"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224
DINO_MAX_SIZE = 480


class MetricUnavailable(Exception):
    """A metric model that cannot be used; the message is the one-line reason."""


def _reason(exc: BaseException) -> str:
    """One short line from an exception raised while loading a model."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_source(name_or_path: str, what: str) -> str:
    """Refuse ``"none"`` and local paths that do not exist before asking any library."""
    if not name_or_path or name_or_path.lower() == OFF:
        raise MetricUnavailable("turned off")
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)
    path = os.path.expanduser(name_or_path)
    if looks_local and not os.path.isdir(path):
        raise MetricUnavailable(f"{what} folder not found: {name_or_path}")
    return path if looks_local else name_or_path


def _quietly(load: Callable[[], object], what: str, name: str):
    """``load()``; any failure becomes :class:`MetricUnavailable` naming the model."""
    try:
        return load()
    except MetricUnavailable:
        raise
    except Exception as exc:  # offline hub, damaged folder, wrong model type, ...
        raise MetricUnavailable(f"cannot load {what} {name!r}: {_reason(exc)}") from None


# ---------------------------------------------------------------------- DINO structure
def resize_shorter(images: torch.Tensor, size: int = DINO_SIZE, max_size: int = DINO_MAX_SIZE) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` so the shorter side is ``size`` (the longer
    at most ``max_size``), without antialiasing, as the reference's tensor ``Resize``."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    out_hw = (new_short, new_long) if h <= w else (new_long, new_short)
    if out_hw == (h, w):
        return images
    return F.interpolate(images, size=out_hw, mode="bilinear", align_corners=False, antialias=False)


def key_self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``A (N, T, T)``: cosine similarity of every pair of key rows of ``keys (N, T, D)``,
    ``A_ij = k_i·k_j / max(‖k_i‖ ‖k_j‖, eps)``."""
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.transpose(-1, -2)) / (norms @ norms.transpose(-1, -2)).clamp(min=eps)


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of the last attention layer of a transformers ViT
    (``…layers.N.attention.k_proj`` in transformers 5, ``…layer.N.attention.attention.key`` in 4.x)."""
    found = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (name.endswith(".k_proj") or name.endswith(".attention.key"))
    ]
    if not found:
        raise MetricUnavailable("the DINO model has no attention key projection (is it a ViT?)")
    return found[-1]


class DinoStructure:
    """Structure distance of PIE-Bench from a transformers ``ViTModel`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device, torch.float32).eval()
        self.key_projection = _last_key_projection(self.model)
        self.image_size = int(getattr(model.config, "image_size", DINO_SIZE))
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_DINO, device: torch.device | str = "cpu") -> DinoStructure:
        """Load a ViT from a local folder or a hub id; :class:`MetricUnavailable` if it cannot be."""
        source = _check_source(name_or_path, "DINO model")

        def build():
            from transformers import ViTModel

            return cls(ViTModel.from_pretrained(source), device)

        return _quietly(build, "DINO model", name_or_path)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Last-layer keys ``(N, T, D)`` of ``images (N, 3, H, W)`` with pixel values in [0, 255]."""
        x = resize_shorter(images.to(self.device, torch.float32))
        x = (x - self.mean) / self.std
        captured: list[torch.Tensor] = []
        handle = self.key_projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != (self.image_size,) * 2)
        finally:
            handle.remove()
        return captured[-1].float()

    def __call__(self, source: np.ndarray, edit: np.ndarray) -> float:
        """``mean (A(edit) − A(source))²`` for uint8 ``(H, W, 3)`` images."""
        pair = torch.from_numpy(np.stack([source, edit]).astype(np.float32)).permute(0, 3, 1, 2)
        sim = key_self_similarity(self.keys(pair))
        return float(F.mse_loss(sim[1], sim[0]))


# ---------------------------------------------------------------------- CLIP
def _features(out) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output
    whose ``pooler_output`` holds them in transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipSimilarity:
    """``max(100·cos(f_img, f_txt), 0)`` with a transformers ``CLIPModel`` and its processor."""

    def __init__(self, model: torch.nn.Module, processor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device, torch.float32).eval()
        self.processor = processor
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_CLIP, device: torch.device | str = "cpu") -> ClipSimilarity:
        """Load a CLIP model and processor from a local folder or a hub id."""
        source = _check_source(name_or_path, "CLIP model")

        def build():
            from transformers import CLIPModel, CLIPProcessor

            return cls(CLIPModel.from_pretrained(source), CLIPProcessor.from_pretrained(source), device)

        return _quietly(build, "CLIP model", name_or_path)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, text: str) -> float:
        """Similarity of a uint8 ``(H, W, 3)`` image with ``text``."""
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.processor(text=[text], return_tensors="pt", padding=True)
        ids = tokens["input_ids"][:, : self.max_tokens].to(self.device)
        attention = tokens["attention_mask"][:, : self.max_tokens].to(self.device)
        f_img = _features(self.model.get_image_features(pixel_values=pixels)).float()
        f_txt = _features(self.model.get_text_features(input_ids=ids, attention_mask=attention)).float()
        cos = F.cosine_similarity(f_img, f_txt, dim=-1, eps=0.0)
        return max(100.0 * float(cos[0]), 0.0)


# ---------------------------------------------------------------------- LPIPS
class Lpips:
    """LPIPS of torchmetrics (``net_type`` squeeze, alex or vgg) on images in ``[0, 1]``."""

    def __init__(self, metric: torch.nn.Module, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.metric = metric.to(self.device)

    @classmethod
    def load(cls, net_type: str = DEFAULT_LPIPS, device: torch.device | str = "cpu") -> Lpips:
        """Build the LPIPS network; needs torchvision and its pretrained backbone weights."""
        if not net_type or net_type.lower() == OFF:
            raise MetricUnavailable("turned off")
        if net_type not in LPIPS_NETS:
            raise MetricUnavailable(f"unknown LPIPS network {net_type!r}; use one of {', '.join(LPIPS_NETS)}")
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise MetricUnavailable("torchvision is not installed (LPIPS needs it)") from None

        def build():
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            return cls(LearnedPerceptualImagePatchSimilarity(net_type=net_type), device)

        return _quietly(build, "LPIPS network", net_type)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """LPIPS of ``(1, 3, H, W)`` images in ``[0, 1]`` (scaled to ``[−1, 1]`` for the network)."""
        value = self.metric(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1)
        self.metric.reset()
        return float(value)


# ---------------------------------------------------------------------- all metrics
@dataclass
class PieMetrics:
    """The seven PIE-Bench metrics of one edit; ``unavailable`` maps a metric to why it is not scored."""

    dino: DinoStructure | None = None
    clip: ClipSimilarity | None = None
    lpips: Lpips | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        dino: str = DEFAULT_DINO,
        clip: str = DEFAULT_CLIP,
        lpips: str = DEFAULT_LPIPS,
        device: torch.device | str = "cpu",
    ) -> PieMetrics:
        """Load every metric model it can; the others' metrics become unavailable."""
        models: dict[str, object] = {}
        reasons: dict[str, str] = {}
        for key, loader, source in (
            ("dino", DinoStructure.load, dino),
            ("clip", ClipSimilarity.load, clip),
            ("lpips", Lpips.load, lpips),
        ):
            try:
                models[key] = loader(source, device)
            except MetricUnavailable as exc:
                reasons[key] = str(exc)
        unavailable = {metric: reasons[need] for metric, need in NEEDS.items() if need in reasons}
        return cls(unavailable=unavailable, **models)  # type: ignore[arg-type]

    def score(self, source: np.ndarray, edit: np.ndarray, mask: np.ndarray, target_prompt: str) -> dict:
        """Metrics of one edit: uint8 ``(H, W, 3)`` images of one size, ``mask (H, W)`` bool
        (True = edit region). Values are floats (``nan`` where undefined), ``None`` when unavailable."""
        if source.shape != edit.shape or source.shape[:2] != mask.shape:
            raise ValueError(f"shapes differ: source {source.shape}, edit {edit.shape}, mask {mask.shape}")
        out: dict[str, float | None] = dict.fromkeys(METRICS)
        keep = torch.from_numpy(~mask).float()[None]
        src = torch.tensor(source).permute(2, 0, 1)[None].float() / 255.0
        tgt = torch.tensor(edit).permute(2, 0, 1)[None].float() / 255.0
        has_background = bool((~mask).any())
        nan = math.nan
        if self.dino is not None:
            out["structure"] = self.dino(source, edit)
        out["psnr"] = float(masked_psnr(tgt, src, keep)[0]) if has_background else nan
        out["mse"] = float(masked_mse(tgt, src, keep)[0]) if has_background else nan
        out["ssim"] = float(masked_ssim(tgt, src, keep)[0]) if has_background else nan
        if self.lpips is not None:
            out["lpips"] = self.lpips(tgt * keep, src * keep) if has_background else nan
        if self.clip is not None:
            out["clip_whole"] = self.clip(edit, target_prompt)
            edited_part = (edit * mask[..., None]).astype(np.uint8)
            out["clip_edited"] = self.clip(edited_part, target_prompt) if mask.any() else nan
        return out
