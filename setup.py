"""Build script. Package metadata lives in pyproject.toml.

The compiled per-step ops (csrc/) are optional: they are built only when sources exist,
``PYINV_NO_EXT`` is not set, and a compiler is present; any build failure is reported and
skipped, so ``pip install -e .`` always works on a CPU-only machine without a compiler.
Without the extension pyinv runs its plain-PyTorch reference ops.
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
    if os.environ.get("PYINV_NO_EXT", "") not in ("", "0"):
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        return []
    # at::parallel_for is OpenMP inline code: without -fopenmp it runs on one thread. The
    # OpenMP runtime is the libgomp.so.1 torch has loaded already (same soname).
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return [CppExtension("pyinv._C", sources, extra_compile_args=["-O3", *omp], extra_link_args=omp)]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
