"""Build script. Package metadata lives in pyproject.toml.

The compiled kernels of the per-step ops (csrc/) are optional: the C++ CPU kernel
(``pyinv._C``) is built when ``PYINV_NO_EXT`` is not set and a compiler is present, the
CUDA kernel (``pyinv._C_cuda``) also needs a CUDA build of torch and nvcc; any build failure
is reported and skipped, so ``pip install -e .`` always works on a CPU-only machine without
a compiler. Each module registers its kernel for the CPU or CUDA dispatch key of the op
that ``pyinv.ops`` defines. Without an extension pyinv runs the Triton kernel (CUDA) or the
plain-PyTorch reference.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:  # torch's build_ext adds the C++ standard, ABI and TORCH_EXTENSION_NAME flags
    from torch.utils.cpp_extension import BuildExtension as _BuildExt
except ImportError:
    _BuildExt = build_ext


class OptionalBuildExt(_BuildExt):
    """build_ext that never fails the install: a failed extension is skipped with a note."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001
            print(f"pyinv: skipping the compiled ops ({exc}); the reference ops will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"pyinv: could not build {ext.name} ({exc}); the reference ops will be used")


def extensions():
    """``pyinv._C`` (the C++ CPU kernel) whenever torch is importable, and ``pyinv._C_cuda``
    (the CUDA kernel) when torch is a CUDA build and nvcc is found (``CUDA_HOME``)."""
    if os.environ.get("PYINV_NO_EXT", "") not in ("", "0"):
        return []
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh")))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError:
        return []
    exts = []
    if cpu_sources:
        # at::parallel_for is OpenMP inline code: without -fopenmp it runs on one thread. The
        # OpenMP runtime is the libgomp.so.1 torch has loaded already (same soname).
        omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        exts.append(
            CppExtension(
                "pyinv._C", cpu_sources, depends=headers, extra_compile_args=["-O3", *omp], extra_link_args=omp
            )
        )
    if cuda_sources and torch.version.cuda is not None and CUDA_HOME is not None:
        # target GPUs: TORCH_CUDA_ARCH_LIST (e.g. "9.0" for H100/H200), else the visible GPU's
        exts.append(
            CUDAExtension(
                "pyinv._C_cuda",
                cuda_sources,
                depends=headers,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
        )
    elif cuda_sources:
        print("pyinv: not building the CUDA ops (torch is not a CUDA build, or nvcc was not found)")
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
