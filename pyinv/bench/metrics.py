"""Background-preservation metrics, computed the way PIE-Bench's evaluation computes them.

PIE-Bench (PnP Inversion, arXiv 2310.01506) scores the part of an image an edit should not
touch by *masking both images* — multiplying them by the keep-mask (1 outside the edit
region, 0 inside) — and computing the ordinary whole-image metric on the masked pair,
with pixels in ``[0, 1]``:

- PSNR: ``10 log10(1 / MSE)`` (``data_range = 1``), in dB;
- MSE: the mean of squared differences over all pixels and channels (PIE-Bench reports ×10⁴);
- SSIM: Gaussian-window SSIM (``data_range = 1``, 11×11, σ = 1.5; PIE-Bench reports ×10²),
  computed in float64.

The masked-out region counts as identical in both images, so these are the reference's
numbers, not per-pixel averages over the kept region only. Images are ``(N, 3, H, W)``
float tensors in ``[0, 1]``; keep-masks ``(N, 1, H, W)`` or ``(N, H, W)`` with 1 = compare.
The metrics come from torchmetrics.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_unit_tensor(images: Image.Image | np.ndarray | list) -> torch.Tensor:
    """``(N, 3, H, W)`` float32 in ``[0, 1]`` from PIL images or uint8 arrays ``(H, W, 3)``."""
    items = images if isinstance(images, list) else [images]
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.float32) for im in items]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


def _masked(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} and {tuple(target.shape)}")
    if keep is None:
        return pred, target
    keep = keep.to(pred.dtype)
    if keep.ndim == 3:
        keep = keep.unsqueeze(1)
    return pred * keep, target * keep


def masked_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image MSE ``(N,)`` of the masked images."""
    from torchmetrics.functional import mean_squared_error

    p, t = _masked(pred, target, keep)
    return torch.stack([mean_squared_error(a.flatten(), b.flatten()) for a, b in zip(p, t, strict=True)])


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR ``(N,)`` in dB of the masked images (``inf`` when they are identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    p, t = _masked(pred, target, keep)
    out = []
    for a, b in zip(p, t, strict=True):
        if torch.equal(a, b):
            out.append(torch.tensor(float("inf")))
        else:
            out.append(peak_signal_noise_ratio(a[None], b[None], data_range=1.0))
    return torch.stack(out)


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM ``(N,)`` of the masked images (11×11 Gaussian window, σ = 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, t = _masked(pred.double(), target.double(), keep)
    # float64: SSIM's variances are differences of means, which cancel badly in float32 on
    # flat images (identical flat images would score 0.999 instead of 1)
    return structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").to(pred.dtype)
