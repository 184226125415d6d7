"""Dispatch of the per-step ops to their implementations.

The fused step is the torch custom op ``torch.ops.pyinv.guided_step`` (schema below), with a
fake (meta) implementation so ``torch.compile(fullgraph=True)`` and export trace through it
without a graph break, and a backward (through the reference's autograd; the step is linear
in every map). Its implementation is chosen once per device type and cached:

============  =====================================================================
device type   implementation
============  =====================================================================
``cuda``      ``triton`` when the ``triton`` package imports, else ``reference``
``cpu``       ``cpp`` when the compiled extension ``pyinv._C`` is present, else
              ``reference``
other         ``reference``
============  =====================================================================

The environment variable ``PYINV_STEP_IMPL=reference|triton|cpp`` overrides the choice for
every device type (read at the first call on each device type); an implementation that
cannot run on a device raises a clear error there. ``triton`` on CPU needs
``TRITON_INTERPRET=1`` (set before ``triton`` is imported); ``cpp`` is CPU only.

The compiled extension registers its CPU kernel under the same op name
(``TORCH_LIBRARY_IMPL(pyinv, CPU, …)``), so it is loaded only when ``cpp`` is chosen for
CPU; once loaded it serves every CPU call of the op in this process.

Nothing here queries a device at import time: the choice for a device type is made when
the op first runs on it (or when :func:`availability` is asked, which only inspects
packages and files).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Optional

import torch

from .kernels.guided_step import HAS_TRITON, guided_step_reference, guided_step_triton

#: environment variable overriding the implementation choice
ENV_IMPL = "PYINV_STEP_IMPL"
#: every implementation name an op may have
IMPL_NAMES = ("reference", "triton", "cpp")
#: device types :func:`availability` reports on
DEVICE_TYPES = ("cpu", "cuda")

_EXTENSION = "pyinv._C"
_ext_loaded: bool | None = None  # None: not tried; False: tried and failed
_ext_error: str | None = None
_ACTIVE: dict[str, str] = {}  # device type → chosen implementation of guided_step


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _extension_present() -> bool:
    """Whether the compiled extension was built (a file check; nothing is loaded)."""
    if _ext_loaded is not None:
        return _ext_loaded
    try:
        return importlib.util.find_spec(_EXTENSION) is not None
    except (ImportError, ValueError):
        return False


def load_extension() -> bool:
    """Load ``pyinv._C`` (registering its CPU kernels) once; ``True`` when it loaded."""
    global _ext_loaded, _ext_error
    if _ext_loaded is None:
        try:
            importlib.import_module(_EXTENSION)
            _ext_loaded = torch._C._dispatch_has_kernel_for_dispatch_key("pyinv::guided_step", "CPU")
            if not _ext_loaded:  # an extension built from other sources: do not recurse into the op
                _ext_error = "it registers no CPU kernel for pyinv::guided_step"
        except (ImportError, OSError) as exc:
            _ext_loaded, _ext_error = False, f"{type(exc).__name__}: {exc}"
    return _ext_loaded


def _usable(name: str, device_type: str) -> tuple[bool, str]:
    """Whether implementation ``name`` can run on ``device_type``, and why not."""
    if name == "reference":
        return True, ""
    if name == "triton":
        if not HAS_TRITON:
            return False, "the triton package is not installed"
        if device_type == "cuda" or (device_type == "cpu" and _triton_interpreted()):
            return True, ""
        return False, f"triton does not run on {device_type} (on cpu only with TRITON_INTERPRET=1)"
    if name == "cpp":
        if device_type != "cpu":
            return False, f"the C++ op runs on cpu only, not {device_type}"
        if not _extension_present():
            why = _ext_error or "it is not built (python setup.py build_ext --inplace)"
            return False, f"the compiled extension {_EXTENSION} is unavailable: {why}"
        return True, ""
    return False, f"unknown implementation {name!r} (choose from {', '.join(IMPL_NAMES)})"


def _choose(device_type: str) -> str:
    """The implementation for ``device_type``: the override or the default order."""
    forced = os.environ.get(ENV_IMPL, "").strip().lower()
    if forced:
        ok, why = _usable(forced, device_type)
        if not ok:
            raise RuntimeError(f"{ENV_IMPL}={forced}: cannot run guided_step on {device_type}: {why}")
        return forced
    preferred = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}.get(device_type, ("reference",))
    return next(name for name in preferred if _usable(name, device_type)[0])


def active(device_type: str) -> str:
    """The implementation of ``guided_step`` on ``device_type``, chosen once and cached
    (``cpp`` on CPU whenever the extension is loaded: its kernel then serves the op)."""
    if device_type == "cpu" and _ext_loaded:
        return "cpp"
    name = _ACTIVE.get(device_type)
    if name is None:
        name = _choose(device_type)
        if name == "cpp" and not load_extension():
            warnings.warn(f"pyinv: {_EXTENSION} failed to load ({_ext_error}); using the reference op", stacklevel=2)
            name = "reference"
        _ACTIVE[device_type] = name
    return name


def reset_dispatch() -> None:
    """Forget the cached choices (they are made again at the next call). A loaded
    extension stays loaded: its CPU kernel keeps serving the op in this process."""
    _ACTIVE.clear()


def availability() -> dict[str, dict]:
    """Per op: ``available`` (implementation → whether it exists here), per device type the
    ``usable`` implementations and the ``active`` one (or ``"error: …"``, what an impossible
    ``PYINV_STEP_IMPL`` would raise), and ``notes`` (why an implementation is missing). Only
    packages and files are inspected; no device is queried and nothing is loaded, e.g.::

        {"guided_step": {"available": {"reference": True, "triton": True, "cpp": False},
                         "usable": {"cpu": ["reference"], "cuda": ["reference", "triton"]},
                         "active": {"cpu": "reference", "cuda": "triton"},
                         "notes": {"cpp": "the compiled extension pyinv._C is unavailable: …"}}}
    """
    ops = {}
    for op in ("guided_step",):
        act, usable, notes = {}, {}, {}
        for dev in DEVICE_TYPES:
            try:
                act[dev] = "cpp" if dev == "cpu" and _ext_loaded else _ACTIVE.get(dev) or _choose(dev)
            except RuntimeError as exc:
                act[dev] = f"error: {exc}"
            usable[dev] = [name for name in IMPL_NAMES if _usable(name, dev)[0]]
        if not HAS_TRITON:
            notes["triton"] = _usable("triton", "cuda")[1]
        if not _extension_present():
            notes["cpp"] = _usable("cpp", "cpu")[1]
        ops[op] = {
            "available": {"reference": True, "triton": HAS_TRITON, "cpp": _extension_present()},
            "usable": usable,
            "active": act,
            "notes": notes,
        }
    return ops


# ----------------------------------------------------------------------------------------
# The custom op
# ----------------------------------------------------------------------------------------


def guided_step_cpp(
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
    """The C++ kernel (``csrc/guided_step.cpp``, CPU tensors): loads the extension, whose
    CPU registration then serves every CPU call of the op in this process."""
    if not load_extension():
        raise RuntimeError(f"the compiled extension {_EXTENSION} is unavailable: {_ext_error}")
    if latents.device.type != "cpu":
        raise RuntimeError(f"the C++ guided_step runs on cpu tensors, not {latents.device.type}")
    return torch.ops.pyinv.guided_step.default(
        latents, out_uncond, out_cond, guidance, float(alpha_t), float(alpha_s), bool(v_prediction), float(sigma),
        noise, offset, pin, pin_mask, blend_mask,
    )  # fmt: skip


_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": guided_step_reference,
    "triton": guided_step_triton,
    "cpp": guided_step_cpp,
}


@torch.library.custom_op("pyinv::guided_step", mutates_args=())
def guided_step_op(
    latents: torch.Tensor,
    out_uncond: torch.Tensor,
    out_cond: torch.Tensor,
    guidance: torch.Tensor,
    alpha_t: float,
    alpha_s: float,
    v_prediction: bool,
    sigma: float,
    noise: Optional[torch.Tensor],  # noqa: UP045 - the schema inference wants typing.Optional
    offset: Optional[torch.Tensor],  # noqa: UP045
    pin: Optional[torch.Tensor],  # noqa: UP045
    pin_mask: Optional[torch.Tensor],  # noqa: UP045
    blend_mask: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:
    """``torch.ops.pyinv.guided_step``: the fused step (all arguments positional, see
    :mod:`pyinv.kernels.guided_step`); the result is a new contiguous ``(B, C, H, W)``
    tensor in ``latents.dtype``."""
    fn = _FUNCTIONS[active(latents.device.type)]
    out = fn(
        latents, out_uncond, out_cond, guidance, alpha_t, alpha_s, v_prediction, sigma,
        noise, offset, pin, pin_mask, blend_mask,
    )  # fmt: skip
    return out.contiguous()


@guided_step_op.register_fake
def _guided_step_fake(latents, *_args):
    """Shape, dtype and device of the result: those of ``latents`` (contiguous)."""
    return torch.empty(latents.shape, dtype=latents.dtype, device=latents.device)


_TENSOR_ARGS = (0, 1, 2, 3, 8, 9, 10, 11, 12)  # positions of the tensor arguments in the schema


def _setup_context(ctx, inputs, output):
    ctx.scalars = inputs[4:8]
    ctx.save_for_backward(*(inputs[i] for i in _TENSOR_ARGS))


def _backward(ctx, grad):
    """Gradients of the step through the reference's autograd (the step is linear in every
    map, so this costs one more step): the op is differentiable wherever the reference is."""
    saved = ctx.saved_tensors
    leaves = [
        t.detach().requires_grad_(True) if t is not None and t.is_floating_point() and ctx.needs_input_grad[i] else t
        for i, t in zip(_TENSOR_ARGS, saved, strict=True)
    ]
    args = dict(zip(_TENSOR_ARGS, leaves, strict=True))
    args.update(zip(range(4, 8), ctx.scalars, strict=True))
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = {}
    if wanted:
        with torch.enable_grad():
            out = guided_step_reference(*(args[i] for i in range(13)))
        found = torch.autograd.grad(out, wanted, grad, allow_unused=True)
        grads = {id(t): g for t, g in zip(wanted, found, strict=True)}
    return tuple(grads.get(id(args[i])) if i in _TENSOR_ARGS and args[i] is not None else None for i in range(13))


guided_step_op.register_autograd(_backward, setup_context=_setup_context)

#: op name → {implementation name: callable with the reference's signature}
IMPLEMENTATIONS = {"guided_step": dict(_FUNCTIONS)}


def guided_step(
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
    """The fused guided step (see :mod:`pyinv.kernels.guided_step`) through the custom op,
    with the active implementation for the latents' device."""
    return torch.ops.pyinv.guided_step(
        latents, out_uncond, out_cond, guidance, float(alpha_t), float(alpha_s), bool(v_prediction), float(sigma),
        noise, offset, pin, pin_mask, blend_mask,
    )  # fmt: skip
