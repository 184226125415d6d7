"""The CUDA guided step (``csrc/guided_step.cu``).

On a machine without a GPU the kernel cannot run, so it is checked in three ways:

1. its element-wise body (``csrc/guided_step_kernel.cuh``) and argument handling
   (``csrc/guided_step_args.h``) are compiled for the CPU into a loop over the thread
   indices (``tests/csrc/guided_step_host.cpp``) and held to the same fp64 tolerance rule as
   every other implementation, on both the 128-bit vector path and the scalar path;
2. the ``.cu`` file compiles with ``nvcc`` for sm_90 (compile only), and its vectorised
   kernels read and write with 128-bit accesses (``LDG.E.128``/``STG.E.128`` in the SASS);
3. on a CUDA machine (skipped elsewhere): the built extension and Triton against the fp64
   reference on the GPU, and the measured dispatch.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from test_guided_step import (
    DTYPES,
    EDGE_SHAPES,
    FLAGS,
    SHAPES,
    edge_case,
    errors,
    flag_id,
    make_case,
    within_rule,
)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


# ----------------------------------------------------------------------------------------
# 1. the kernel body on the CPU
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def body(tmp_path_factory):
    """``torch.ops.pyinv_test``: the CUDA body built for the CPU (skipped without a compiler),
    as the CPU kernel of ``pyinv_test::guided_step_cuda_body``, an op with the schema of
    ``pyinv::guided_step``."""
    from torch.utils import cpp_extension

    from pyinv.ops import GUIDED_STEP_SCHEMA

    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the test extension")
    lib = torch.library.Library("pyinv_test", "FRAGMENT")
    lib.define("guided_step_cuda_body" + GUIDED_STEP_SCHEMA)
    build = tmp_path_factory.mktemp("cuda_body")
    cpp_extension.load(
        name="pyinv_cuda_body_test",
        sources=[str(ROOT / "tests" / "csrc" / "guided_step_host.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O2"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    yield torch.ops.pyinv_test
    lib._destroy()


def _call(body):
    def run(*args, **kw):
        names = ("v_prediction", "sigma", "noise", "offset", "pin", "pin_mask", "blend_mask")
        defaults = {"v_prediction": False, "sigma": 0.0}
        return body.guided_step_cuda_body(*args, *(kw.get(n, defaults.get(n)) for n in names))

    return run


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_body_matches_fp64_reference(body, shape, dtype, v_pred, flags):
    args, kw = make_case(shape, DTYPES[dtype], v_pred, flags)
    err, err_ref, floor = errors(_call(body), args, kw)
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_body_edge_shapes_and_per_channel_blend(body, shape):
    err, err_ref, floor = errors(_call(body), *edge_case(shape))
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


def test_cuda_body_loop_style_arguments(body):
    """Expanded (stride-0) pin and noise, no pin mask, a non-contiguous input."""
    args, kw = make_case((3, 4, 6, 8), torch.float32, False, (True,) * 4)
    kw["pin"], kw["pin_mask"] = kw["pin"][:1].expand(3, 4, 6, 8), None
    kw["noise"] = kw["noise"][1:2].expand(3, 4, 6, 8)
    args = (args[0].transpose(2, 3).contiguous().transpose(2, 3), *args[1:])
    err, err_ref, floor = errors(_call(body), args, kw)
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


@pytest.mark.parametrize(
    ("dtype", "shape", "misalign", "width"),
    [
        ("fp32", (3, 4, 64, 64), False, 4),
        ("fp16", (3, 4, 64, 64), False, 8),
        ("bf16", (3, 4, 8, 8), False, 8),
        ("fp64", (3, 4, 64, 64), False, 2),
        ("fp32", (3, 4, 7, 9), False, 4),  # C·H·W = 252: divisible by 4 ...
        ("fp16", (3, 4, 7, 9), False, 1),  # ... not by 8
        ("fp32", (3, 3, 7, 9), False, 1),  # 189
        ("fp32", (3, 4, 64, 64), True, 1),  # rows start 4 bytes off a 16-byte boundary
    ],
)
def test_vector_width_and_both_paths(body, dtype, shape, misalign, width):
    """The vector width prepare() picks, and the result on that path."""
    t = DTYPES[dtype]
    args, kw = make_case(shape, t, True, (True,) * 4)
    if misalign:
        buffer = torch.empty(args[0].numel() + 1, dtype=t)
        buffer[1:] = args[0].flatten()
        args = (buffer[1:].view(shape), *args[1:])
    assert body.vector_width(*args[:3]) == width
    err, err_ref, floor = errors(_call(body), args, kw)
    assert within_rule(err, err_ref, floor), (err, err_ref, floor)


# ----------------------------------------------------------------------------------------
# 2. nvcc, compile only
# ----------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton's package carries one
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None


@pytest.fixture(scope="module")
def cuda_object(tmp_path_factory) -> Path:
    """``csrc/guided_step.cu`` compiled for sm_90 with torch's extension flags (as CMake builds
    it: without the Python module wrapper, whose headers would triple the compile time)."""
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path_factory.mktemp("nvcc")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(CSRC)]
    # A CPU build of torch ships the c10/cuda headers but not this one generated header.
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).exists() for p in includes):
        shim = out / "shim" / macros
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(out / "shim"))
    obj = out / "guided_step.o"
    cmd = [
        nvcc, "-c", str(CSRC / "guided_step.cu"), "-o", str(obj), "-std=c++17", "-O3",
        "-gencode=arch=compute_90,code=sm_90", *cpp_extension.COMMON_NVCC_FLAGS,
        *(f"-I{p}" for p in includes),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return obj


def test_cuda_source_compiles_with_nvcc(cuda_object):
    assert cuda_object.stat().st_size > 0


def test_cuda_kernels_use_128_bit_accesses(cuda_object):
    """The vectorised fp32/fp16/bf16/fp64 kernels load and store 16 bytes at a time."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here")
    sass = subprocess.run([tool, "--dump-sass", str(cuda_object)], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0]
        kernels[name] = block
    vectorised = {n: b for n, b in kernels.items() if re.search(r"kernelILi(4|8|2)E", n)}
    assert len(vectorised) == 8, sorted(kernels)  # 4 dtypes × {ε, v}
    for name, code in vectorised.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, name


# ----------------------------------------------------------------------------------------
# 3. on a GPU (skipped without one)
# ----------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpu_impl_matches_fp64_reference(impl, dtype):
    """Every shape, prediction type and flag combination on the GPU (one test per dtype)."""
    from pyinv import ops

    if not ops._usable(impl, "cuda")[0]:
        pytest.skip(ops._usable(impl, "cuda")[1])
    move = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    failures = []
    for shape, v_pred, flags in itertools.product([*SHAPES, *EDGE_SHAPES], (False, True), FLAGS):
        args, kw = make_case(shape, DTYPES[dtype], v_pred, flags)
        args, kw = tuple(map(move, args)), {k: move(v) for k, v in kw.items()}
        err, err_ref, floor = errors(ops.IMPLEMENTATIONS["guided_step"][impl], args, kw)
        if not within_rule(err, err_ref, floor):
            failures.append((shape, v_pred, flag_id(flags), err, err_ref, floor))
    assert not failures, failures[:10]


@needs_cuda
def test_gpu_dispatch_measures_and_keeps_the_faster(monkeypatch):
    from pyinv import ops

    monkeypatch.delenv(ops.ENV_IMPL, raising=False)
    ops.reset_dispatch()
    try:
        args, kw = make_case((3, 4, 64, 64), torch.float16, False, (False, False, True, True))
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        out = ops.guided_step(*args, **kw)
        torch.testing.assert_close(out, ops.guided_step_reference(*args, **kw), rtol=2e-3, atol=2e-3)
        chosen = ops.active("cuda")
        names = ops.candidates("cuda")
        assert chosen in names
        if len(names) > 1:
            measured = ops.availability()["guided_step"]["measured"]["cuda"]
            assert set(measured) == set(names) and chosen == min(measured, key=measured.get)
    finally:
        ops.reset_dispatch()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
