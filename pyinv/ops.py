"""Dispatch of the per-step ops to their implementations.

The fused step is the torch custom op ``torch.ops.pyinv.guided_step``, defined here, once,
with the schema :data:`GUIDED_STEP_SCHEMA`::

    pyinv::guided_step(Tensor latents, Tensor out_uncond, Tensor out_cond, Tensor guidance,
                       float alpha_t, float alpha_s, bool v_prediction, float sigma,
                       Tensor? noise, Tensor? offset, Tensor? pin, Tensor? pin_mask,
                       Tensor? blend_mask) -> Tensor

``latents``, ``out_uncond``, ``out_cond``, ``noise``, ``offset`` and ``pin`` are ``(B, C, H, W)``
(the maps broadcast to the latents), ``guidance`` and ``pin_mask`` ``(B,)``, ``blend_mask``
broadcastable to ``(B, C, H, W)``; the result is a new contiguous ``(B, C, H, W)`` tensor in
``latents.dtype`` (the formulas: :mod:`pyinv.kernels.guided_step`). The op has a fake (meta)
implementation, so ``torch.compile(fullgraph=True)`` and export trace through it without a
graph break, and a backward (through the reference's autograd; the step is linear in every
map). Its kernels, per dispatch key:

============================  ===========================================================
dispatch key                  kernel
============================  ===========================================================
CompositeExplicitAutograd     the routing function here: runs the implementation chosen
                              for the tensors' device type (below)
``CPU``                       the C++ kernel (``csrc/guided_step.cpp``), registered by the
                              compiled extension ``pyinv._C`` when it is loaded
``CUDA``                      the CUDA kernel (``csrc/guided_step.cu``), registered by the
                              compiled extension ``pyinv._C_cuda`` when it is loaded
Meta / fake, Autograd         the fake implementation and the backward, here
============================  ===========================================================

The extensions define no op of their own: they only add the kernel for their key
(``TORCH_LIBRARY_IMPL(pyinv, CPU, m)`` / ``(pyinv, CUDA, m)``). The implementation is chosen
once per device type and cached:

============  =====================================================================
device type   implementation
============  =====================================================================
``cuda``      the faster of ``cuda`` (the compiled extension ``pyinv._C_cuda``) and
              ``triton``, timed on the first call's own arguments; whichever of the
              two is present when only one is; else ``reference``
``cpu``       ``cpp`` when the compiled extension ``pyinv._C`` is present, else
              ``reference``
other         ``reference``
============  =====================================================================

The environment variable ``PYINV_STEP_IMPL=reference|triton|cpp|cuda`` overrides the
choice for every device type (read when the choice is made); an implementation that
cannot run on a device raises a clear error there. ``triton`` on CPU needs
``TRITON_INTERPRET=1`` (set before ``triton`` is imported); ``cpp`` is CPU only and
``cuda`` CUDA only.

A compiled kernel serves its key directly when it is the chosen implementation of its
device type. While a loaded one is not (``PYINV_STEP_IMPL`` asks for another, Triton was
timed faster, or on CUDA the first call has not timed the two yet), the routing function is
also registered for that key, on top of the compiled kernel, so that the choice holds; it
is taken off again, outside any call of it, once the compiled kernel is chosen (when the
choice is made inside a call of that routing kernel, that is, on CUDA when the extension
was loaded before the first call, the routing kernel stays and calls the compiled one).

Every implementation can also be called by name, with the reference's signature, through
:data:`IMPLEMENTATIONS` (``reference``: :func:`guided_step_reference`; ``triton``:
:func:`guided_step_triton`; ``cpp`` and ``cuda``: the same C++ functions as the CPU and
CUDA kernels, which the extension modules also expose as ``pyinv._C.guided_step`` and
``pyinv._C_cuda.guided_step``, called outside the dispatcher), e.g. to compare them. An
extension is loaded when its implementation is first called or chosen; the choice for a
device type is made at the op's first call on it, or when its compiled extension is loaded
before that (unless the choice needs the first call's timing).

Nothing here queries a device at import time (:func:`availability` only inspects packages
and files).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import sys
import warnings
from collections.abc import Callable

import torch

from .kernels.guided_step import HAS_TRITON, guided_step_reference, guided_step_triton

#: the op's qualified name
OP_NAME = "pyinv::guided_step"
#: the op's schema (its arguments and result), the one definition of it
GUIDED_STEP_SCHEMA = (
    "(Tensor latents, Tensor out_uncond, Tensor out_cond, Tensor guidance, float alpha_t, float alpha_s, "
    "bool v_prediction, float sigma, Tensor? noise, Tensor? offset, Tensor? pin, Tensor? pin_mask, "
    "Tensor? blend_mask) -> Tensor"
)
#: environment variable overriding the implementation choice
ENV_IMPL = "PYINV_STEP_IMPL"
#: every implementation name an op may have
IMPL_NAMES = ("reference", "triton", "cpp", "cuda")
#: device types :func:`availability` reports on
DEVICE_TYPES = ("cpu", "cuda")
#: preferred implementations per device type, best first; where several compiled ones are
#: usable on a device that can time them (CUDA), the fastest is measured at the first call
PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}
#: compiled implementation → (its extension module, the dispatch key it registers a kernel for)
EXTENSIONS = {
    "cpp": ("pyinv._C", "CPU"),
    "cuda": ("pyinv._C_cuda", "CUDA"),
}
#: device type → the compiled implementation whose kernel serves its dispatch key
COMPILED = {key.lower(): impl for impl, (_, key) in EXTENSIONS.items()}
_BUILD_HINT = {
    "cpp": "it is not built (python setup.py build_ext --inplace)",
    "cuda": "it is not built (it needs a CUDA build of torch and nvcc: python setup.py build_ext --inplace)",
}

_ext_state: dict[str, tuple[bool, str | None]] = {}  # implementation → (loaded, error)
_ACTIVE: dict[str, str] = {}  # device type → chosen implementation of guided_step
_MEASURED: dict[str, dict[str, float]] = {}  # device type → {implementation: median ms at first call}
_ROUTED: dict[str, torch.library.Library] = {}  # dispatch key → the library holding the routing kernel there


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _extension_present(impl: str = "cpp") -> bool:
    """Whether the compiled extension of ``impl`` was built (a file check; nothing is loaded)."""
    if impl in _ext_state:
        return _ext_state[impl][0]
    try:
        return importlib.util.find_spec(EXTENSIONS[impl][0]) is not None
    except (ImportError, ValueError):
        return False


def load_extension(impl: str = "cpp") -> bool:
    """Load the compiled extension of ``impl`` (``cpp`` or ``cuda``) once; its import
    registers its kernel for ``pyinv::guided_step``'s CPU or CUDA key. ``True`` when it
    loaded and did; then the key's kernels are set to the device's choice (see :func:`_settle`)."""
    if impl not in _ext_state:
        module, key = EXTENSIONS[impl]
        try:
            mod = importlib.import_module(module)
            if not torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key):
                _ext_state[impl] = (False, f"it registers no {key} kernel for {OP_NAME}")
            elif not callable(getattr(mod, "guided_step", None)):
                _ext_state[impl] = (False, f"{module} has no function guided_step")
            else:
                _ext_state[impl] = (True, None)
        except (ImportError, OSError, RuntimeError) as exc:
            _ext_state[impl] = (False, f"{type(exc).__name__}: {exc}")
        if _ext_state[impl][0]:
            _settle(key.lower())
    return _ext_state[impl][0]


def _ext_error(impl: str) -> str:
    return (_ext_state.get(impl, (False, None))[1]) or _BUILD_HINT[impl]


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
    if name in EXTENSIONS:
        home = EXTENSIONS[name][1].lower()
        if device_type != home:
            return False, f"the {name} op runs on {home} only, not {device_type}"
        if not _extension_present(name):
            return False, f"the compiled extension {EXTENSIONS[name][0]} is unavailable: {_ext_error(name)}"
        return True, ""
    return False, f"unknown implementation {name!r} (choose from {', '.join(IMPL_NAMES)})"


def _forced(device_type: str) -> str | None:
    """The implementation ``PYINV_STEP_IMPL`` asks for (checked), or ``None``."""
    forced = os.environ.get(ENV_IMPL, "").strip().lower()
    if not forced:
        return None
    ok, why = _usable(forced, device_type)
    if not ok:
        raise RuntimeError(f"{ENV_IMPL}={forced}: cannot run guided_step on {device_type}: {why}")
    return forced


def candidates(device_type: str) -> list[str]:
    """The implementations the default choice picks from on ``device_type``: the usable
    compiled ones in order of preference, else ``["reference"]``."""
    found = [name for name in PREFERENCE.get(device_type, ()) if _usable(name, device_type)[0]]
    return found or ["reference"]


def _decided(device_type: str) -> str | None:
    """The implementation for ``device_type`` when no timing is needed to choose it (the
    override, or the only candidate), else ``None``. Raises for an impossible override."""
    forced = _forced(device_type)
    if forced is not None:
        return forced
    names = candidates(device_type)
    return names[0] if len(names) == 1 or device_type != "cuda" else None


def _time_ms(name: str, args: tuple, repeats: int = 20) -> float:
    """Median milliseconds of one call of implementation ``name`` on CUDA ``args``."""
    fn = _FUNCTIONS[name]
    for _ in range(3):  # warm-up (Triton compiles here)
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fastest(names: list[str], args: tuple) -> str:
    """The fastest of ``names`` on ``args`` (CUDA tensors); implementations that fail are
    dropped with a warning. The timings are kept for :func:`availability`."""
    timings = {}
    for name in names:
        try:
            timings[name] = _time_ms(name, args)
        except Exception as exc:  # noqa: BLE001 - a broken implementation must not stop the step
            warnings.warn(f"pyinv: guided_step {name} failed on cuda ({exc}); not using it", stacklevel=3)
    if not timings:
        return "reference"
    _MEASURED["cuda"] = timings
    return min(timings, key=timings.get)


def _choose(device_type: str, sample: tuple | None = None) -> str:
    """The implementation of ``guided_step`` on ``device_type``, chosen once and cached
    (see :func:`active`). Only the first load of an extension changes a dispatch key's
    kernels here (see :func:`load_extension`): a routing kernel, which calls this, runs on a
    key whose extension is loaded already, so it is never taken off while it runs."""
    name = _ACTIVE.get(device_type)
    if name is not None:
        return name
    name = _decided(device_type)
    if name is None:
        names = candidates(device_type)
        if sample is None or torch.cuda.is_current_stream_capturing():
            return names[0]  # not measured yet: no caching
        name = _fastest(names, sample)
    if name in EXTENSIONS and not load_extension(name):
        why = f"pyinv: {EXTENSIONS[name][0]} failed to load ({_ext_error(name)}); using the reference op"
        warnings.warn(why, stacklevel=3)
        name = "reference"
    _ACTIVE[device_type] = name
    return name


def active(device_type: str, sample: tuple | None = None) -> str:
    """The implementation of ``guided_step`` on ``device_type``, chosen once and cached.

    With several compiled candidates on CUDA, the first call's arguments ``sample`` are
    used to time each and the fastest is kept (not while a CUDA graph is being captured:
    then the first candidate runs and the choice is made at a later call). Once chosen,
    the device's compiled kernel (when loaded) serves its dispatch key exactly when it is
    the chosen implementation.
    """
    name = _choose(device_type, sample)
    _settle(device_type)
    return name


def _settle(device_type: str) -> None:
    """Make the kernel on ``device_type``'s dispatch key match the choice: when the device's
    compiled extension is loaded, the routing kernel is registered on top of the compiled
    one while another implementation is chosen (or none yet), and taken off once the
    compiled one is. A choice that needs no timing is made here, before the first call."""
    impl = COMPILED.get(device_type)
    if impl is None or not _ext_state.get(impl, (False, None))[0]:
        return
    if device_type not in _ACTIVE:
        try:
            name = _decided(device_type)
        except RuntimeError:  # an impossible override: raised by the first call
            name = None
        if name is not None:
            _ACTIVE[device_type] = name
    key = EXTENSIONS[impl][1]
    routed = _ACTIVE.get(device_type) != impl
    if routed and key not in _ROUTED:
        lib = torch.library.Library("pyinv", "IMPL")
        with warnings.catch_warnings():  # the dispatcher notes that the compiled kernel is overridden
            warnings.simplefilter("ignore")
            lib.impl("guided_step", _route_at_key, key)
        _ROUTED[key] = lib
    elif not routed and key in _ROUTED:
        _ROUTED.pop(key)._destroy()


def reset_dispatch() -> None:
    """Forget the cached choices and timings (they are made again at the next call, or here
    when a loaded extension's device needs no timing), and set the dispatch keys' kernels
    accordingly."""
    _ACTIVE.clear()
    _MEASURED.clear()
    for device_type in COMPILED:
        _settle(device_type)


def availability() -> dict[str, dict]:
    """Per op: ``available`` (implementation → whether it exists here), per device type the
    ``usable`` implementations and the ``active`` one (``"fastest of cuda, triton"`` until
    the first call has timed them; ``"error: …"``, what an impossible ``PYINV_STEP_IMPL``
    would raise), ``measured`` (first-call timings in ms, once made) and ``notes`` (why an
    implementation is missing). Only packages and files are inspected; no device is queried
    and nothing is loaded, e.g.::

        {"guided_step": {"available": {"reference": True, "triton": True, "cpp": True, "cuda": False},
                         "usable": {"cpu": ["reference", "cpp"], "cuda": ["reference", "triton"]},
                         "active": {"cpu": "cpp", "cuda": "triton"}, "measured": {},
                         "notes": {"cuda": "the compiled extension pyinv._C_cuda is unavailable: …"}}}
    """
    ops = {}
    for op in ("guided_step",):
        act, usable, notes = {}, {}, {}
        for dev in DEVICE_TYPES:
            try:
                forced = _forced(dev)
                names = candidates(dev)
                if dev in _ACTIVE:
                    act[dev] = _ACTIVE[dev]
                elif forced or len(names) == 1:
                    act[dev] = forced or names[0]
                else:
                    act[dev] = f"fastest of {', '.join(names)}"
            except RuntimeError as exc:
                act[dev] = f"error: {exc}"
            usable[dev] = [name for name in IMPL_NAMES if _usable(name, dev)[0]]
        if not HAS_TRITON:
            notes["triton"] = _usable("triton", "cuda")[1]
        for impl, (_, key) in EXTENSIONS.items():
            if not _extension_present(impl):
                notes[impl] = _usable(impl, key.lower())[1]
        ops[op] = {
            "available": {
                "reference": True,
                "triton": HAS_TRITON,
                **{impl: _extension_present(impl) for impl in EXTENSIONS},
            },
            "usable": usable,
            "active": act,
            "measured": {dev: dict(t) for dev, t in _MEASURED.items()},
            "notes": notes,
        }
    return ops


# ----------------------------------------------------------------------------------------
# The custom op
# ----------------------------------------------------------------------------------------


def _compiled(impl: str) -> Callable[..., torch.Tensor]:
    """The compiled implementation ``impl`` by name (``cpp``: ``csrc/guided_step.cpp``, CPU
    tensors; ``cuda``: ``csrc/guided_step.cu``, CUDA tensors) with the reference's
    signature: the extension module's ``guided_step``, the same C++ function its dispatch
    key's kernel is, called outside the dispatcher. The extension is loaded at the first call."""
    module, key = EXTENSIONS[impl]
    device_type = key.lower()

    def run(
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
        if not load_extension(impl):
            raise RuntimeError(f"the compiled extension {module} is unavailable: {_ext_error(impl)}")
        if latents.device.type != device_type:
            raise RuntimeError(f"the {impl} guided_step runs on {device_type} tensors, not {latents.device.type}")
        return sys.modules[module].guided_step(
            latents, out_uncond, out_cond, guidance, float(alpha_t), float(alpha_s), bool(v_prediction),
            float(sigma), noise, offset, pin, pin_mask, blend_mask,
        )  # fmt: skip

    run.__name__ = run.__qualname__ = f"guided_step_{impl}"
    return run


guided_step_cpp = _compiled("cpp")
guided_step_cuda = _compiled("cuda")

_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": guided_step_reference,
    "triton": guided_step_triton,
    "cpp": guided_step_cpp,
    "cuda": guided_step_cuda,
}


def _route_at_key(*args) -> torch.Tensor:
    """The routing kernel on a compiled kernel's dispatch key while that kernel is not the
    chosen implementation: runs the chosen one. It never takes itself off the key (that
    happens outside its calls, see :func:`_settle`)."""
    return _FUNCTIONS[_choose(args[0].device.type, args)](*args).contiguous()


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=GUIDED_STEP_SCHEMA)
def guided_step_op(
    latents: torch.Tensor,
    out_uncond: torch.Tensor,
    out_cond: torch.Tensor,
    guidance: torch.Tensor,
    alpha_t: float,
    alpha_s: float,
    v_prediction: bool,
    sigma: float,
    noise: torch.Tensor | None,
    offset: torch.Tensor | None,
    pin: torch.Tensor | None,
    pin_mask: torch.Tensor | None,
    blend_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``torch.ops.pyinv.guided_step``'s CompositeExplicitAutograd kernel, the routing
    function: runs the implementation chosen for the latents' device type (all arguments
    positional, see :mod:`pyinv.kernels.guided_step`); the result is a new contiguous
    ``(B, C, H, W)`` tensor in ``latents.dtype``."""
    args = (
        latents, out_uncond, out_cond, guidance, alpha_t, alpha_s, v_prediction, sigma,
        noise, offset, pin, pin_mask, blend_mask,
    )  # fmt: skip
    return _FUNCTIONS[active(latents.device.type, args)](*args).contiguous()


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

# An extension imported before this module (``import pyinv._C``) registered its kernel for
# the op already: record it, so that the choice governs its key as well.
for _impl, (_module, _) in EXTENSIONS.items():
    if _module in sys.modules:
        load_extension(_impl)


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
