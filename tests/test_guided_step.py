"""The fused step op: every implementation against an fp64 evaluation of the reference.

Tolerance rule (DESIGN.md): ``max|impl(x) − ref64(x)| ≤ 2·max|ref(x) − ref64(x)| + floor``
where ``ref`` is the reference in the same dtype as ``impl`` and ``ref64`` the reference on
the same (already rounded) inputs in float64; ``floor`` is a few ulps of the dtype at the
result's scale. The Triton kernel runs under ``TRITON_INTERPRET=1`` in a subprocess (the
flag must be set before ``triton`` is imported, and this session has imported pyinv already):
that subprocess runs this file as a script and reports the errors as JSON.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
SHAPES = [(3, 4, 7, 9), (1, 3, 32, 32), (5, 4, 64, 64)]
#: (noise, offset, pin, blend): every combination
FLAGS = list(itertools.product((False, True), repeat=4))
#: the interpreter is slow: Triton runs every combination on the small shapes only
TRITON_SHAPES = [(3, 4, 7, 9), (2, 3, 5, 33)]
TRITON_BIG = (5, 4, 64, 64)


def flag_id(flags) -> str:
    names = [n for n, on in zip(("noise", "offset", "pin", "blend"), flags, strict=True) if on]
    return "+".join(names) or "plain"


def case_id(shape, dtype: str, v_pred: bool, flags) -> str:
    return f"{'x'.join(map(str, shape))}-{dtype}-{'v' if v_pred else 'eps'}-{flag_id(flags)}"


def make_case(shape, dtype: torch.dtype, v_pred: bool, flags, seed: int = 0):
    """Arguments of one call (no zeros anywhere: random maps, guidance ≠ 0, 1)."""
    noise_on, offset_on, pin_on, blend_on = flags
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype)

    kw = dict(v_prediction=v_pred, sigma=0.0)
    if noise_on:
        kw.update(sigma=0.35, noise=rnd(*shape))
    if offset_on:
        kw["offset"] = 0.1 * rnd(*shape)
    if pin_on:
        kw["pin"] = rnd(*shape)
        kw["pin_mask"] = torch.arange(B) % 2 == 0  # row 0 pinned, as the loop does
    if blend_on:
        m = torch.rand(B, 1, H, W, generator=g)
        kw["blend_mask"] = torch.where(m < 0.3, 0.0, torch.where(m > 0.7, 1.0, m)).to(dtype)
    guidance = torch.linspace(1.0, 7.5, B).to(dtype)
    return (rnd(*shape), rnd(*shape), rnd(*shape), guidance, 0.42, 0.71), kw


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def errors(fn, args, kw) -> tuple[float, float, float]:
    """``(error of fn, error of the same-dtype reference, floor)`` against fp64."""
    from pyinv.kernels.guided_step import guided_step_reference

    exact = guided_step_reference(*map(_double, args), **{k: _double(v) for k, v in kw.items()})
    out = fn(*args, **kw)
    ref = guided_step_reference(*args, **kw)
    assert out.shape == exact.shape and out.dtype == args[0].dtype
    err = (out.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    floor = 2 * torch.finfo(args[0].dtype).eps * max(exact.abs().max().item(), 1.0)
    return err, err_ref, floor


def within_rule(err: float, err_ref: float, floor: float) -> bool:
    return err <= 2 * err_ref + floor


# ----------------------------------------------------------------------------------------
# in-process implementations: the reference (and the C++ op when built)
# ----------------------------------------------------------------------------------------


def _cpp_built() -> bool:
    """A file check only: the extension is loaded by the first test that uses it."""
    from pyinv import ops

    return ops._extension_present()


#: implementations held to the tolerance rule against the reference (the reference itself is
#: checked against the schedule's step math and for its rounding, below)
IN_PROCESS = [pytest.param("cpp", marks=pytest.mark.skipif(not _cpp_built(), reason="pyinv._C not built"))]


@pytest.mark.parametrize("impl", IN_PROCESS)
@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_in_process_impl_matches_fp64_reference(impl, shape, dtype, v_pred, flags):
    from pyinv.ops import IMPLEMENTATIONS

    args, kw = make_case(shape, DTYPES[dtype], v_pred, flags)
    err, err_ref, floor = errors(IMPLEMENTATIONS["guided_step"][impl], args, kw)
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


EDGE_SHAPES = [(1, 1, 1, 1), (2, 3, 1, 7), (2, 3, 7, 1), (3, 2, 33, 35)]


def edge_case(shape, seed: int = 1):
    """Every flag on, with a per-channel blend mask ``(1, C, H, W)`` instead of ``(B, 1, H, W)``."""
    args, kw = make_case(shape, torch.float32, True, (True,) * 4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    kw["blend_mask"] = torch.rand(1, *shape[1:], generator=g)
    return args, kw


@pytest.mark.parametrize("impl", IN_PROCESS)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_edge_shapes_and_per_channel_blend(impl, shape):
    from pyinv.ops import IMPLEMENTATIONS

    args, kw = edge_case(shape)
    err, err_ref, floor = errors(IMPLEMENTATIONS["guided_step"][impl], args, kw)
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


def composed_step(
    z,
    u,
    c,
    w,
    alpha_t,
    alpha_s,
    v_prediction=False,
    sigma=0.0,
    noise=None,
    offset=None,
    pin=None,
    pin_mask=None,
    blend_mask=None,
):
    """The step built from :mod:`pyinv.schedule`'s own math (CFG, x̂0/ε split, DDIM step), the
    way the unfused loop and the inversions compute it, then correction and blend row by row."""
    from pyinv.schedule import ddim_step, guided, split_prediction

    kind = "v_prediction" if v_prediction else "epsilon"
    m = guided(u, c, w)
    if sigma > 0.0:
        x0, eps = split_prediction(m, z, alpha_t, kind)
        out = alpha_s**0.5 * x0 + (1.0 - alpha_s - sigma**2) ** 0.5 * eps + sigma * noise
    else:
        out = ddim_step(m, z, alpha_t, alpha_s, kind)
    if offset is not None:
        out = out + offset
    rows = list(out)
    if pin is not None:
        rows = [pin[b] if pin_mask[b] else row for b, row in enumerate(rows)]
    if blend_mask is not None:
        rows = [rows[0] + blend_mask[b] * (row - rows[0]) for b, row in enumerate(rows)]
    return torch.stack(rows)


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
def test_reference_is_the_schedule_step_math(v_pred, flags):
    """In fp64 the reference equals the step composed from the schedule's functions."""
    from pyinv.kernels.guided_step import guided_step_reference

    args, kw = make_case((3, 4, 7, 9), torch.float64, v_pred, flags)
    kw = {k: v for k, v in kw.items() if k != "v_prediction"}
    out = guided_step_reference(*args, v_prediction=v_pred, **kw)
    torch.testing.assert_close(out, composed_step(*args, v_prediction=v_pred, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flags", [(False,) * 4, (True,) * 4], ids=flag_id)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reference_rounds_half_inputs_once(dtype, flags):
    """Half-precision inputs run fp32 math and round once, to the output: every element is
    within half an ulp of the fp64 result (``0.5·eps·|x|``), plus a floor for the fp32 math
    (the largest intermediate, ``w·c`` ≈ 30, times a few fp32 roundings). Math in the half
    dtype itself rounds at every operation and misses this by far."""
    from pyinv.kernels.guided_step import guided_step_reference

    args, kw = make_case((3, 4, 32, 32), DTYPES[dtype], True, flags)
    exact = guided_step_reference(*map(_double, args), **{k: _double(v) for k, v in kw.items()})
    out = guided_step_reference(*args, **kw).double()
    eps = torch.finfo(DTYPES[dtype]).eps
    assert ((out - exact).abs() <= 0.5 * eps * exact.abs() + 1e-4).all()


def test_reference_float64_keeps_float64_math():
    from pyinv.kernels.guided_step import guided_step_reference

    args, kw = make_case((2, 3, 5, 6), torch.float64, True, (True, True, True, True))
    out = guided_step_reference(*args, **kw)
    assert out.dtype == torch.float64
    half = guided_step_reference(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **kw)
    assert (out - half.double()).abs().max() > 0  # fp32 math would have rounded


def test_op_matches_reference_with_loop_style_arguments():
    """Expanded (stride-0) pin and noise, a pin without a mask, a non-contiguous input."""
    from pyinv import ops
    from pyinv.kernels.guided_step import guided_step_reference

    args, kw = make_case((3, 4, 6, 5), torch.float32, False, (True, True, True, True))
    kw["pin"] = kw["pin"][:1].expand(3, 4, 6, 5)
    kw["noise"] = kw["noise"][1:2].expand(3, 4, 6, 5)
    z = args[0].transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    args = (z, *args[1:])
    for extra in ({}, {"pin_mask": None}):
        k = {**kw, **extra}
        out = ops.guided_step(*args, **k)
        assert out.is_contiguous()
        torch.testing.assert_close(out, guided_step_reference(*args, **k), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# the custom op: opcheck, torch.compile, dispatch
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(False,) * 4, (True,) * 4], ids=flag_id)
def test_opcheck(flags):
    import pyinv.ops  # noqa: F401  (registers the op)

    args, kw = make_case((3, 4, 5, 7), torch.float32, True, flags)
    full = (*args, kw["v_prediction"], kw["sigma"]) + tuple(
        kw.get(k) for k in ("noise", "offset", "pin", "pin_mask", "blend_mask")
    )
    torch.library.opcheck(torch.ops.pyinv.guided_step.default, full)


@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
def test_op_gradients(v_pred):
    """The op is differentiable in every map (through the reference's autograd)."""
    from pyinv import ops

    args, kw = make_case((3, 2, 3, 4), torch.float64, v_pred, (True,) * 4)
    names = ("noise", "offset", "pin", "blend_mask")
    maps = [t.clone().requires_grad_(True) for t in (*args[:4], *(kw[k] for k in names))]

    def step(z, u, c, w, noise, offset, pin, blend):
        return ops.guided_step(z, u, c, w, 0.42, 0.71, v_pred, 0.35, noise, offset, pin, kw["pin_mask"], blend)

    assert torch.autograd.gradcheck(step, maps)
    full = (*maps[:4], 0.42, 0.71, v_pred, 0.35, *maps[4:7], kw["pin_mask"], maps[7])
    torch.library.opcheck(torch.ops.pyinv.guided_step.default, full)


def test_compile_fullgraph_has_no_graph_break():
    from pyinv import ops

    args, kw = make_case((2, 4, 6, 6), torch.float32, False, (True, True, True, True))

    def step(z, u, c, w, noise, offset, pin, pin_mask, blend_mask):
        out = ops.guided_step(z, u, c, w, 0.42, 0.71, False, 0.35, noise, offset, pin, pin_mask, blend_mask)
        return out * 2.0

    tensors = (*args[:4], *(kw[k] for k in ("noise", "offset", "pin", "pin_mask", "blend_mask")))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*tensors), step(*tensors))


def test_dispatch_choice_and_override(monkeypatch):
    from pyinv import ops

    try:
        monkeypatch.delenv(ops.ENV_IMPL, raising=False)
        ops.reset_dispatch()
        info = ops.availability()["guided_step"]
        assert info["available"]["reference"] is True
        assert "reference" in info["usable"]["cpu"] and "cpp" not in info["usable"]["cuda"]
        assert "cuda" not in info["usable"]["cpu"]
        for impl in ("cpp", "cuda"):
            assert info["available"][impl] or impl in info["notes"]
        assert info["active"]["cpu"] == ("cpp" if info["available"]["cpp"] else "reference")
        gpu = [n for n in ("cuda", "triton") if info["available"][n]]
        expected = {0: "reference", 1: gpu[0] if gpu else None, 2: "fastest of cuda, triton"}[len(gpu)]
        assert info["active"]["cuda"] == expected
        monkeypatch.setenv(ops.ENV_IMPL, "reference")
        ops.reset_dispatch()
        assert ops.availability()["guided_step"]["active"] == {"cpu": "reference", "cuda": "reference"}
        assert ops.active("cpu") == "reference"
        monkeypatch.setenv(ops.ENV_IMPL, "nonsense")
        ops.reset_dispatch()
        assert ops.availability()["guided_step"]["active"]["cuda"].startswith("error:")
        with pytest.raises(RuntimeError, match="unknown implementation"):
            ops.active("cuda")
        monkeypatch.setenv(ops.ENV_IMPL, "cpp")
        ops.reset_dispatch()
        with pytest.raises(RuntimeError, match="runs on cpu only"):
            ops.active("cuda")
        monkeypatch.setenv(ops.ENV_IMPL, "cuda")
        ops.reset_dispatch()
        with pytest.raises(RuntimeError, match="runs on cuda only"):
            ops.active("cpu")
    finally:
        monkeypatch.delenv(ops.ENV_IMPL, raising=False)
        ops.reset_dispatch()


def test_gpu_choice_is_the_faster_by_measurement(monkeypatch):
    """With both CUDA and Triton usable, the first call's arguments time each and the
    faster is kept; a failing implementation is dropped; no sample, no caching."""
    from pyinv import ops

    timings = {"cuda": 0.020, "triton": 0.012}
    calls = []

    def fake_time(name, args, repeats=20):
        calls.append(name)
        if timings[name] is None:
            raise RuntimeError("broken")
        return timings[name]

    monkeypatch.delenv(ops.ENV_IMPL, raising=False)
    monkeypatch.setattr(ops, "candidates", lambda dev: ["cuda", "triton"] if dev == "cuda" else ["reference"])
    monkeypatch.setattr(ops, "_time_ms", fake_time)
    monkeypatch.setattr(ops, "load_extension", lambda impl: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    try:
        ops.reset_dispatch()
        assert ops.availability()["guided_step"]["active"]["cuda"] == "fastest of cuda, triton"
        assert ops.active("cuda") == "cuda" and not calls  # no sample: the first candidate, not cached
        assert ops.active("cuda", sample=("args",)) == "triton"
        assert sorted(calls) == ["cuda", "triton"]
        info = ops.availability()["guided_step"]
        assert info["active"]["cuda"] == "triton" and info["measured"]["cuda"] == timings
        assert ops.active("cuda", sample=("args",)) == "triton" and len(calls) == 2  # cached
        timings.update(cuda=0.005)
        ops.reset_dispatch()
        assert ops.active("cuda", sample=("args",)) == "cuda"
        timings.update(cuda=None)
        ops.reset_dispatch()
        with pytest.warns(UserWarning, match="cuda failed"):
            assert ops.active("cuda", sample=("args",)) == "triton"
    finally:
        monkeypatch.undo()
        ops.reset_dispatch()


def _key_kernel(key: str) -> str:
    """Where the kernel that serves ``pyinv::guided_step``'s dispatch key ``key`` was registered
    (the dispatcher's table line, with ``/`` path separators)."""
    table = torch._C._dispatch_dump_table("pyinv::guided_step")
    return next(line for line in table.splitlines() if line.startswith(f"{key}:")).replace("\\", "/")


def _full_args(args, kw) -> tuple:
    """The op's 13 positional arguments from a :func:`make_case` case."""
    names = ("noise", "offset", "pin", "pin_mask", "blend_mask")
    return (*args, kw["v_prediction"], kw["sigma"], *(kw.get(k) for k in names))


def test_one_op_and_one_schema_with_the_extensions_loaded():
    """The compiled extensions add kernels for ``pyinv::guided_step``'s dispatch keys and
    define no op of their own: one ``pyinv::guided_step*`` op, with the schema of ops.py."""
    from pyinv import ops

    loaded = [impl for impl in ops.EXTENSIONS if ops._extension_present(impl) and ops.load_extension(impl)]
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyinv::"))
    assert names == ["pyinv::guided_step"]
    assert str(torch.ops.pyinv.guided_step.default._schema) == ops.OP_NAME + ops.GUIDED_STEP_SCHEMA
    assert torch.ops.pyinv.guided_step.overloads() == ["default"]
    for impl in loaded:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(ops.OP_NAME, ops.EXTENSIONS[impl][1]), impl


@pytest.mark.skipif(not _cpp_built(), reason="pyinv._C not built")
def test_cpu_key_kernel_is_the_cpp_kernel_and_matches_the_reference(monkeypatch):
    """With ``cpp`` chosen the CPU key is served by the C++ kernel itself (held to the
    tolerance rule through the op); with another implementation chosen, by the routing
    kernel on top of it, and the C++ kernel again once ``cpp`` is chosen back."""
    from pyinv import ops
    from pyinv.kernels.guided_step import guided_step_reference

    monkeypatch.delenv(ops.ENV_IMPL, raising=False)
    try:
        assert ops.load_extension("cpp")
        ops.reset_dispatch()
        assert ops.active("cpu") == "cpp"
        assert "csrc/guided_step.cpp" in _key_kernel("CPU")
        for dtype, v_pred, flags in itertools.product(("fp32", "bf16"), (False, True), FLAGS):
            args, kw = make_case((3, 4, 7, 9), DTYPES[dtype], v_pred, flags)
            op = lambda *a, **k: torch.ops.pyinv.guided_step(*_full_args(a, k))
            err, err_ref, floor = errors(op, args, kw)
            assert within_rule(err, err_ref, floor), (dtype, v_pred, flag_id(flags), err, err_ref, floor)
        monkeypatch.setenv(ops.ENV_IMPL, "reference")
        ops.reset_dispatch()
        assert "pyinv/ops.py" in _key_kernel("CPU")
        args, kw = make_case((3, 4, 7, 9), torch.float32, True, (True,) * 4)
        full = _full_args(args, kw)
        assert torch.equal(torch.ops.pyinv.guided_step(*full), guided_step_reference(*full))
        monkeypatch.delenv(ops.ENV_IMPL)
        ops.reset_dispatch()
        assert "csrc/guided_step.cpp" in _key_kernel("CPU")
    finally:
        monkeypatch.undo()
        ops.reset_dispatch()


@pytest.mark.skipif(not _cpp_built(), reason="pyinv._C not built")
def test_extension_imported_before_the_op_is_defined():
    """``import pyinv._C`` before :mod:`pyinv.ops`: its CPU kernel waits for the op's
    definition, and ops.py takes it into account (it serves the CPU key, ``cpp`` chosen)."""
    script = """
import torch, pyinv._C
from pyinv import ops
from pyinv.kernels.guided_step import guided_step_reference
table = torch._C._dispatch_dump_table("pyinv::guided_step")
line = next(l for l in table.splitlines() if l.startswith("CPU:")).replace("\\\\", "/")
assert "csrc/guided_step.cpp" in line, line
assert ops._ACTIVE == {"cpu": "cpp"}, ops._ACTIVE
z = torch.randn(2, 3, 4, 5)
args = (z, 0.5 * z, 0.2 * z, torch.tensor([1.0, 7.5]), 0.42, 0.71)
assert torch.allclose(ops.guided_step(*args), guided_step_reference(*args), rtol=1e-6, atol=1e-6)
"""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYINV_STEP_IMPL"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(not _cpp_built(), reason="pyinv._C not built")
def test_routing_kernel_is_taken_off_only_outside_its_calls(monkeypatch):
    """A choice made inside the routing kernel (here: an impossible override that left the
    CPU choice open, then lifted) runs the C++ implementation through the routing kernel,
    which stays on the key until the choice is settled outside it."""
    from pyinv import ops

    try:
        assert ops.load_extension("cpp")
        monkeypatch.setenv(ops.ENV_IMPL, "cuda")  # not possible on the CPU: no choice yet
        ops.reset_dispatch()
        assert "cpu" not in ops._ACTIVE and "pyinv/ops.py" in _key_kernel("CPU")
        with pytest.raises(RuntimeError, match="runs on cuda only"):
            ops.guided_step(*make_case((2, 3, 4, 5), torch.float32, False, (False,) * 4)[0])
        monkeypatch.delenv(ops.ENV_IMPL)
        args, kw = make_case((2, 3, 4, 5), torch.float32, False, (True,) * 4)
        full = _full_args(args, kw)
        out = torch.ops.pyinv.guided_step(*full)
        assert ops._ACTIVE["cpu"] == "cpp" and "pyinv/ops.py" in _key_kernel("CPU")
        assert torch.equal(out, ops.IMPLEMENTATIONS["guided_step"]["cpp"](*full))
        assert ops.active("cpu") == "cpp" and "csrc/guided_step.cpp" in _key_kernel("CPU")
        assert torch.equal(torch.ops.pyinv.guided_step(*full), out)
    finally:
        monkeypatch.undo()
        ops.reset_dispatch()


# ----------------------------------------------------------------------------------------
# Triton, interpreted on CPU in a subprocess
# ----------------------------------------------------------------------------------------

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")

TRITON_CASES = [
    (shape, dtype, v_pred, flags)
    for shape in TRITON_SHAPES
    for dtype in DTYPES
    for v_pred in (False, True)
    for flags in FLAGS
] + [(TRITON_BIG, dtype, True, (True,) * 4) for dtype in DTYPES]


def _triton_report() -> dict:
    """Run in the subprocess: errors of every Triton case, opcheck and a compiled call."""
    from pyinv import ops
    from pyinv.kernels.guided_step import guided_step_triton

    report = {"cases": {}}
    for shape, dtype, v_pred, flags in TRITON_CASES:
        args, kw = make_case(shape, DTYPES[dtype], v_pred, flags)
        report["cases"][case_id(shape, dtype, v_pred, flags)] = errors(guided_step_triton, args, kw)
    # loop-style arguments: expanded pin, no pin mask, a non-contiguous input
    args, kw = make_case((3, 4, 6, 5), torch.float32, False, (True, True, True, True))
    kw["pin"], kw["pin_mask"] = kw["pin"][:1].expand(3, 4, 6, 5), None
    args = (args[0].transpose(2, 3).contiguous().transpose(2, 3), *args[1:])
    report["cases"]["loop-style"] = errors(guided_step_triton, args, kw)
    for shape in EDGE_SHAPES:
        report["cases"]["edge-" + "x".join(map(str, shape))] = errors(guided_step_triton, *edge_case(shape))
    # the custom op dispatching to Triton on CPU
    assert ops.active("cpu") == "triton"
    args, kw = make_case((3, 4, 5, 7), torch.float32, True, (True,) * 4)
    full = (*args, kw["v_prediction"], kw["sigma"]) + tuple(
        kw.get(k) for k in ("noise", "offset", "pin", "pin_mask", "blend_mask")
    )
    torch.library.opcheck(torch.ops.pyinv.guided_step.default, full)
    compiled = torch.compile(lambda *a: torch.ops.pyinv.guided_step(*a) + 1.0, fullgraph=True, backend="aot_eager")
    report["op_vs_reference"] = (compiled(*full) - 1.0 - ops.guided_step_reference(*full)).abs().max().item()
    return report


@pytest.fixture(scope="module")
def triton_report() -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYINV_STEP_IMPL="triton", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize(
    "case",
    [case_id(*c) for c in TRITON_CASES] + ["loop-style"] + ["edge-" + "x".join(map(str, s)) for s in EDGE_SHAPES],
)
def test_triton_matches_fp64_reference(triton_report, case):
    err, err_ref, floor = triton_report["cases"][case]
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


@needs_triton
def test_triton_through_the_op_opcheck_and_compile(triton_report):
    assert triton_report["op_vs_reference"] < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_triton_kernel_compiles_for_sm90(dtype):
    """The interpreter is lenient about types: lower the kernel for an H100 (no GPU needed)
    with every flag on, and check the maps are read and written with 128-bit accesses."""
    import inspect
    import re

    from pyinv.kernels import guided_step as gs

    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - depends on the triton version
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    if not hasattr(gs._guided_step_kernel, "fn") or os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        pytest.skip("the kernel was built for the interpreter")
    params = list(inspect.signature(gs._guided_step_kernel.fn).parameters)
    elem = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp64": "fp64"}[dtype]
    scalars = ("sqrt_at", "sqrt_1m_at", "sqrt_as", "direction", "sigma")
    constexprs = dict(
        V_PRED=True, HAS_NOISE=True, HAS_OFFSET=True, HAS_PIN=True, HAS_PIN_MASK=True, HAS_BLEND=True,
        CDT=tl.float64 if dtype == "fp64" else tl.float32, SCALARS_F64=dtype == "fp64", BLOCK=gs.TRITON_BLOCK,
    )  # fmt: skip
    signature = {}
    for name in params:
        if name.endswith("_ptr"):
            signature[name] = "*" + {"pm_ptr": "u8", "k_ptr": "fp64"}.get(name, elem)
        elif name in scalars:
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr" if name in constexprs else "i32"
    # what the launcher's specialisation sees for SD-sized latents: aligned pointers, sizes ÷ 16
    aligned = [n for n in params if n.endswith("_ptr") or n in ("n_row", "H", "W", "s_z", "s_u", "s_c", "s_n", "s_o")]
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(
        gs._guided_step_kernel,
        signature,
        constexprs={(params.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except RuntimeError as exc:  # pragma: no cover - e.g. no ptxas in this triton build
        if "ptxas" in str(exc).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {exc}")
        raise
    ptx = compiled.asm["ptx"]
    assert re.search(r"ld\.global(\.nc)?\.v[24]\.b(32|64)", ptx) and re.search(r"st\.global\.v[24]\.b(32|64)", ptx)


if __name__ == "__main__":  # the Triton subprocess (see triton_report)
    torch.set_num_threads(1)
    print(json.dumps(_triton_report()))
