"""Shared fixtures: tiny models (built once per session) and synthetic test images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

import pyinv

# Property tests draw the same examples on every run (a CI run never fails by chance);
# HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tiny models are far faster on one thread than with threads fighting for 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def export_cache_dir(tmp_path_factory):
    """Exported graphs go to one directory per test session (never the user's cache); the
    graphs a session exports are reused by its later tests, as a user's are."""
    path = tmp_path_factory.mktemp("pyinv-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYINV_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny_cli_default():
    """Make ``tiny`` the CLI's default model for a test module (``pytestmark = usefixtures``)."""
    from pyinv.cli import common

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "DEFAULT_MODEL", "tiny")
        yield


def make_test_image(size: int = 48, seed: int = 0) -> Image.Image:
    """A smooth synthetic photo stand-in: a colour gradient with a disc and mild noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.8 - 0.5 * xx * yy], axis=-1)
    disc = (xx - 0.55) ** 2 + (yy - 0.45) ** 2 < 0.06
    img[disc] = [0.9, 0.2, 0.1]
    img = np.clip(img + 0.02 * rng.randn(*img.shape), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def editor() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny")


@pytest.fixture(scope="session")
def editor64() -> pyinv.Editor:
    """The tiny model in float64: for exact-equivalence checks that fp32 rounding would blur
    (on the CPU a UNet row's result depends slightly on what else is in its batch)."""
    return pyinv.Editor.from_pretrained("tiny", dtype="fp64")


@pytest.fixture(scope="session")
def editor_v() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny-v")


@pytest.fixture(scope="session")
def image() -> Image.Image:
    return make_test_image()


def rel_err(a, b) -> float:
    """Relative mean squared error ``‖a − b‖² / ‖b‖²``."""
    return float((a - b).pow(2).sum() / b.pow(2).sum())
