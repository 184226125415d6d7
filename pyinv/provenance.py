"""Where a result comes from: library versions, hardware and the source commit.

:func:`environment` is what ``pyinv info`` shows; :func:`provenance` is the block every
written benchmark report carries. Imports nothing of the command line or the benchmarks,
so both can use it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``"not installed"``."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """Versions and hardware, as ``pyinv info`` reports them."""
    import torch

    from . import __version__

    cuda = torch.cuda.is_available()
    return {
        "pyinv": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def git_commit() -> str | None:
    """The commit of the source tree pyinv runs from, when it is a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(device) -> dict[str, Any]:
    """Device, threads, library versions and commit, for every written report."""
    import torch

    name = torch.cuda.get_device_name(device) if getattr(device, "type", str(device)) == "cuda" else "cpu"
    return {"device": name, "threads": torch.get_num_threads(), "commit": git_commit(), "versions": environment()}
