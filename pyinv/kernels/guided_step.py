"""The per-step op: everything the loop does between two UNet calls, for all branches.

For each batch row b (a branch), with UNet outputs ``u_b`` (unconditional) and ``c_b``
(conditional) at level ``ᾱ_t``, guidance ``w_b``:

1. CFG:        ``m_b = u_b + w_b (c_b − u_b)``           (ε or v, whichever the UNet predicts)
2. split:      ``x̂0_b, ε_b`` from ``m_b`` and ``z_b``     (see :func:`pyinv.schedule.split_prediction`)
3. step:       DDIM ``z'_b = √ᾱ_s x̂0_b + √(1−ᾱ_s) ε_b``, or DDPM with ``σ`` and noise map ``n_b``:
               ``z'_b = √ᾱ_s x̂0_b + √(max(1−ᾱ_s−σ², 0)) ε_b + σ n_b``
4. correction: Direct Inversion, either ``z'_b += o_b`` (reference offsets) or
               ``z'_b = p_b`` where ``pin_mask_b`` (pinned source)
5. blend:      LocalBlend, ``z'_b = z'_0 + m_b (z'_b − z'_0)`` with mask ``m (B, 1, H, W)``
               (row 0 is the source; applied after the correction, as the reference does)

Shapes: latents, outputs, noise, offset and pin ``(B, C, H, W)``; guidance ``(B,)``;
pin_mask ``(B,)`` bool. Math in fp32 whatever the input dtype; the result has the
latents' dtype (float64 inputs keep float64 math).

Implementations here: :func:`guided_step_reference` (plain PyTorch, the source of truth;
steps 1–3 are :mod:`pyinv.schedule`'s own functions, the ones the unfused loop and the
inversions use) and :func:`guided_step_triton` (one Triton program per row ``b`` and block
of ``C·H·W`` elements: each element is read once and written once; with LocalBlend the
program also recomputes row 0's stepped value at the same offsets, so no second pass is
needed). The compiled kernels are in ``csrc/``: ``guided_step.cpp`` (CPU) and
``guided_step.cu`` (CUDA), both built on the per-element functions of
``guided_step_kernel.cuh``. :mod:`pyinv.ops` defines the custom op ``pyinv::guided_step``
(the compiled kernels serve its CPU and CUDA dispatch keys) and chooses the implementation
per device type.
"""

from __future__ import annotations

import math

import torch

from ..schedule import ddpm_mean, guided


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
    """Plain PyTorch reference of the fused guided step (see the module docstring), built
    from :mod:`pyinv.schedule`'s step math: :func:`~pyinv.schedule.guided` (CFG),
    :func:`~pyinv.schedule.ddpm_mean` (the split into ``x̂0, ε`` and the move to ``ᾱ_s``,
    ``√ᾱ_s x̂0 + √(max(1−ᾱ_s−σ², 0)) ε``: the DDIM step :func:`~pyinv.schedule.ddim_step`
    when ``σ = 0``), then the noise term ``σ n``, the correction and the blend."""
    dt = torch.promote_types(latents.dtype, torch.float32)  # fp32 math for half inputs
    z = latents.to(dt)
    m = guided(out_uncond.to(dt), out_cond.to(dt), guidance.to(dt))
    out = ddpm_mean(m, z, alpha_t, alpha_s, sigma, "v_prediction" if v_prediction else "epsilon")
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


# ----------------------------------------------------------------------------------------
# Triton kernel: one pass over memory, one program per (row b, block of C·H·W elements).
# ----------------------------------------------------------------------------------------

try:  # Triton is optional: without it only the reference (and the C++ op) are available.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - not installed, or a broken install: never fail `import pyinv`
    triton = None
    tl = None

HAS_TRITON = triton is not None

#: elements of one row each Triton program handles
TRITON_BLOCK = 1024


def _row_contiguous(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` broadcast to ``shape`` (B, C, H, W) such that each row ``t[b]`` is one contiguous
    block: any batch stride is kept (an ``expand``-ed row costs no copy); otherwise a copy."""
    t = t.expand(shape)
    C, H, W = shape[1:]
    s = t.stride()
    if (s[3] == 1 or W == 1) and (s[2] == W or H == 1) and (s[1] == H * W or C == 1):
        return t
    return t.contiguous()


if HAS_TRITON:

    @triton.jit
    def _stepped_row(
        z_ptr,
        u_ptr,
        c_ptr,
        g_ptr,
        n_ptr,
        o_ptr,
        p_ptr,
        pm_ptr,
        row,
        offs,
        mask,
        s_z,
        s_u,
        s_c,
        s_g,
        s_n,
        s_o,
        s_p,
        s_pm,
        sqrt_at,
        sqrt_1m_at,
        sqrt_as,
        direction,
        sigma,
        V_PRED: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        HAS_PIN: tl.constexpr,
        HAS_PIN_MASK: tl.constexpr,
        CDT: tl.constexpr,
    ):
        """``z'_row`` at ``offs`` (steps 1–4 of the module docstring) in the compute dtype."""
        row64 = row.to(tl.int64)
        z = tl.load(z_ptr + row64 * s_z + offs, mask=mask, other=0.0).to(CDT)
        u = tl.load(u_ptr + row64 * s_u + offs, mask=mask, other=0.0).to(CDT)
        c = tl.load(c_ptr + row64 * s_c + offs, mask=mask, other=0.0).to(CDT)
        w = tl.load(g_ptr + row64 * s_g).to(CDT)
        m = u + w * (c - u)
        if V_PRED:
            x0 = sqrt_at * z - sqrt_1m_at * m
            eps = sqrt_at * m + sqrt_1m_at * z
        else:
            eps = m
            x0 = (z - sqrt_1m_at * eps) / sqrt_at
        out = sqrt_as * x0 + direction * eps
        if HAS_NOISE:
            out = out + sigma * tl.load(n_ptr + row64 * s_n + offs, mask=mask, other=0.0).to(CDT)
        if HAS_OFFSET:
            out = out + tl.load(o_ptr + row64 * s_o + offs, mask=mask, other=0.0).to(CDT)
        if HAS_PIN:
            p = tl.load(p_ptr + row64 * s_p + offs, mask=mask, other=0.0).to(CDT)
            if HAS_PIN_MASK:
                pinned = tl.load(pm_ptr + row64 * s_pm) != 0
                out = tl.where(pinned, p, out)
            else:
                out = p
        return out

    @triton.jit
    def _guided_step_kernel(
        out_ptr,
        z_ptr,
        u_ptr,
        c_ptr,
        g_ptr,
        n_ptr,
        o_ptr,
        p_ptr,
        pm_ptr,
        bm_ptr,
        k_ptr,
        n_row,
        C,
        H,
        W,
        s_z,
        s_u,
        s_c,
        s_g,
        s_n,
        s_o,
        s_p,
        s_pm,
        s_bm0,
        s_bm1,
        s_bm2,
        s_bm3,
        sqrt_at,
        sqrt_1m_at,
        sqrt_as,
        direction,
        sigma,
        V_PRED: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        HAS_PIN: tl.constexpr,
        HAS_PIN_MASK: tl.constexpr,
        HAS_BLEND: tl.constexpr,
        CDT: tl.constexpr,
        SCALARS_F64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        if SCALARS_F64:  # float arguments arrive as fp32: fp64 math reads them from a tensor
            sqrt_at = tl.load(k_ptr + 0)
            sqrt_1m_at = tl.load(k_ptr + 1)
            sqrt_as = tl.load(k_ptr + 2)
            direction = tl.load(k_ptr + 3)
            sigma = tl.load(k_ptr + 4)
        row = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_row
        # fmt: off
        out = _stepped_row(z_ptr, u_ptr, c_ptr, g_ptr, n_ptr, o_ptr, p_ptr, pm_ptr, row, offs, mask,
                           s_z, s_u, s_c, s_g, s_n, s_o, s_p, s_pm, sqrt_at, sqrt_1m_at, sqrt_as, direction, sigma,
                           V_PRED, HAS_NOISE, HAS_OFFSET, HAS_PIN, HAS_PIN_MASK, CDT)
        if HAS_BLEND:
            # LocalBlend mixes with row 0's *stepped* value: recompute it here for the same
            # offsets (a few extra loads) instead of a second pass over the output.
            src = _stepped_row(z_ptr, u_ptr, c_ptr, g_ptr, n_ptr, o_ptr, p_ptr, pm_ptr, row * 0, offs, mask,
                               s_z, s_u, s_c, s_g, s_n, s_o, s_p, s_pm, sqrt_at, sqrt_1m_at, sqrt_as, direction,
                               sigma, V_PRED, HAS_NOISE, HAS_OFFSET, HAS_PIN, HAS_PIN_MASK, CDT)
            # fmt: on
            hw = H * W
            ch = offs // hw
            rem = offs - ch * hw
            h = rem // W
            x = rem - h * W
            b_off = row.to(tl.int64) * s_bm0 + ch * s_bm1 + h * s_bm2 + x * s_bm3
            bm = tl.load(bm_ptr + b_off, mask=mask, other=0.0).to(CDT)
            out = src + bm * (out - src)
        tl.store(out_ptr + row.to(tl.int64) * n_row + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def guided_step_triton(
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
    """Triton twin of :func:`guided_step_reference`: same arguments, same result (to rounding).

    ``latents`` must be 4-D ``(B, C, H, W)`` (any sizes); the other maps broadcast to it and
    each of their rows must be contiguous (an expanded batch dimension is fine; anything else
    is copied). ``blend_mask`` may be any shape broadcastable to ``(B, C, H, W)``. Runs on
    CUDA, or on CPU under ``TRITON_INTERPRET=1``. The result is a new contiguous tensor in
    ``latents.dtype``; the math is fp32 (fp64 for fp64 latents).
    """
    if not HAS_TRITON:
        raise RuntimeError("guided_step_triton needs the `triton` package, which is not installed")
    if latents.ndim != 4:
        raise ValueError(f"guided_step_triton: latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    if pin_mask is not None and pin is None:
        raise ValueError("guided_step_triton: pin_mask given without pin")
    shape = latents.shape
    B, C, H, W = shape
    device = latents.device
    z = _row_contiguous(latents, shape)
    u = _row_contiguous(out_uncond, shape)
    c = _row_contiguous(out_cond, shape)
    g = guidance.to(device).reshape(-1).expand(B)
    use_noise = noise is not None and sigma > 0.0
    n = _row_contiguous(noise, shape) if use_noise else z
    o = _row_contiguous(offset, shape) if offset is not None else z
    p = _row_contiguous(pin, shape) if pin is not None else z
    pm = pin_mask.to(device=device).reshape(-1).expand(B) if pin_mask is not None else g
    if pm.dtype == torch.bool:
        pm = pm.view(torch.uint8)
    bm = blend_mask.to(device).expand(shape) if blend_mask is not None else z
    out = torch.empty(shape, dtype=latents.dtype, device=device)
    n_row = C * H * W
    if out.numel() == 0:
        return out
    scalars = (
        math.sqrt(alpha_t),
        math.sqrt(1.0 - alpha_t),
        math.sqrt(alpha_s),
        math.sqrt(max(1.0 - alpha_s - sigma * sigma, 0.0)),
        float(sigma),
    )
    f64 = latents.dtype == torch.float64
    k = torch.tensor(scalars, dtype=torch.float64, device=device) if f64 else z
    grid = (triton.cdiv(n_row, TRITON_BLOCK), B)
    _guided_step_kernel[grid](
        out,
        z,
        u,
        c,
        g,
        n,
        o,
        p,
        pm,
        bm,
        k,
        n_row,
        C,
        H,
        W,
        z.stride(0),
        u.stride(0),
        c.stride(0),
        g.stride(0),
        n.stride(0),
        o.stride(0),
        p.stride(0),
        pm.stride(0),
        *bm.stride(),
        *scalars,
        V_PRED=bool(v_prediction),
        HAS_NOISE=use_noise,
        HAS_OFFSET=offset is not None,
        HAS_PIN=pin is not None,
        HAS_PIN_MASK=pin_mask is not None,
        HAS_BLEND=blend_mask is not None,
        CDT=tl.float64 if f64 else tl.float32,
        SCALARS_F64=f64,
        BLOCK=TRITON_BLOCK,
    )
    return out
