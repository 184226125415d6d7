"""The per-step op: everything the loop does between two UNet calls, for all branches.

For each batch row b (a branch), with UNet outputs ``u_b`` (unconditional) and ``c_b``
(conditional) at level ``ᾱ_t``, guidance ``w_b``:

1. CFG:        ``m_b = u_b + w_b (c_b − u_b)``           (ε or v, whichever the UNet predicts)
2. split:      ``x̂0_b, ε_b`` from ``m_b`` and ``z_b``     (see :func:`pyinv.schedule.split_prediction`)
3. step:       DDIM ``z'_b = √ᾱ_s x̂0_b + √(1−ᾱ_s) ε_b``, or DDPM with ``σ`` and noise map ``n_b``:
               ``z'_b = √ᾱ_s x̂0_b + √(1−ᾱ_s−σ²) ε_b + σ n_b``
4. correction: Direct Inversion, either ``z'_b += o_b`` (reference offsets) or
               ``z'_b = p_b`` where ``pin_mask_b`` (pinned source)
5. blend:      LocalBlend, ``z'_b = z'_0 + m_b (z'_b − z'_0)`` with mask ``m (B, 1, H, W)``
               (row 0 is the source; applied after the correction, as the reference does)

Shapes: latents, outputs, noise, offset and pin ``(B, C, H, W)``; guidance ``(B,)``;
pin_mask ``(B,)`` bool. Math in fp32 whatever the input dtype; the result has the
latents' dtype (float64 inputs keep float64 math).
"""

from __future__ import annotations

import math

import torch


def guided_step_reference(
    latents: torch.Tensor,
    out_uncond: torch.Tensor,
    out_cond: torch.Tensor,
    guidance: torch.Tensor,
    alpha_t: float,
    alpha_s: float,
    v_prediction: bool = False,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    pin: torch.Tensor | None = None,
    pin_mask: torch.Tensor | None = None,
    blend_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch reference of the fused guided step (see the module docstring)."""
    dt = torch.promote_types(latents.dtype, torch.float32)  # fp32 math for half inputs
    z = latents.to(dt)
    u, c = out_uncond.to(dt), out_cond.to(dt)
    w = guidance.to(dt).view(-1, *([1] * (z.ndim - 1)))
    m = u + w * (c - u)
    sa, sb = math.sqrt(alpha_t), math.sqrt(1.0 - alpha_t)
    if v_prediction:
        x0 = sa * z - sb * m
        eps = sa * m + sb * z
    else:
        eps = m
        x0 = (z - sb * eps) / sa
    direction = math.sqrt(max(1.0 - alpha_s - sigma * sigma, 0.0))
    out = math.sqrt(alpha_s) * x0 + direction * eps
    if noise is not None and sigma > 0.0:
        out = out + sigma * noise.to(dt)
    if offset is not None:
        out = out + offset.to(dt)
    if pin is not None:
        mask = pin_mask.view(-1, *([1] * (z.ndim - 1))) if pin_mask is not None else torch.ones(1, dtype=torch.bool)
        out = torch.where(mask.to(out.device), pin.to(dt), out)
    if blend_mask is not None:
        source = out[:1]
        out = source + blend_mask.to(dt) * (out - source)
    return out.to(latents.dtype)
