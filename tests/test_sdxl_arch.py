"""The ``sdxl-arch`` preset: SDXL base 1.0's architecture with random weights, built on the
``meta`` device here (no weights, no memory), and how the loader builds it."""

from __future__ import annotations

import pytest
import torch

from pyinv import presets
from pyinv.models import load_model
from pyinv.sdxl import added_conditions


@pytest.fixture(scope="module")
def arch():
    return presets.build_sdxl_arch(dtype=torch.bfloat16, device="meta")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_arch_has_sdxl_base_parameter_counts(arch):
    # the published sizes of SDXL base 1.0's parts (diffusers' checkpoint)
    assert count(arch["unet"]) == 2_567_463_684
    assert count(arch["text_encoder"]) == 123_060_480
    assert count(arch["text_encoder_2"]) == 694_659_840
    assert count(arch["vae"]) == 83_653_863


def test_sdxl_arch_is_built_in_the_dtype_asked_for(arch):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        dtypes = {p.dtype for p in arch[part].parameters()}
        assert dtypes == {torch.bfloat16}, part
        assert {p.device.type for p in arch[part].parameters()} == {"meta"}
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_sdxl_arch_packs_like_sdxl_base(arch):
    added = added_conditions(arch["unet"], arch["text_encoder_2"], 77, 768 + 1280, arch["image_size"])
    assert added.pooled_dim == 1280 and added.time_ids == (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)
    assert arch["unet"].config.cross_attention_dim == 2048
    assert arch["vae"].config.scaling_factor == 0.13025 and arch["force_zeros_for_empty_prompt"]


def test_fp64_builds_in_fp32():
    parts = presets.build_sdxl_arch(dtype=torch.float64, device="meta")
    assert {p.dtype for p in parts["unet"].parameters()} == {torch.float32}


def test_loader_builds_sized_presets_in_the_models_dtype(monkeypatch):
    asked = {}

    def stand_in(dtype, device):  # the tiny SDXL model in place of the 3.5 B-parameter one
        asked.update(dtype=dtype, device=device)
        return presets.build_tiny_xl()

    monkeypatch.setitem(presets.PRESETS, "sdxl-arch", stand_in)
    model = load_model("sdxl-arch", dtype="bf16")
    assert asked == {"dtype": torch.bfloat16, "device": torch.device("cpu")}
    assert model.family == "SDXL" and model.dtype == torch.bfloat16
