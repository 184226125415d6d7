"""Which layers the controllers use on SDXL: checked on SDXL base's real UNet architecture
(built on the ``meta`` device: no weights, no memory), and LocalBlend's side rule; plus the
memory census of a Direct + P2P edit on ``tiny-xl``."""

from __future__ import annotations

import types

import pytest
import torch

import pyinv
from pyinv import P2P, LocalBlend, MasaCtrl, PnP
from pyinv.control.attention import attention_layers
from pyinv.control.p2p import SD_BLEND_SIDE, _blend_layers, blend_side
from pyinv.control.pnp import reference_feature_layer

#: SDXL base 1.0's UNet (diffusers' config of stabilityai/stable-diffusion-xl-base-1.0)
SDXL_BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    layers_per_block=2,
)


@pytest.fixture(scope="module")
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_BASE_UNET)


@pytest.fixture(scope="module")
def sdxl_layers(sdxl_unet):
    return attention_layers(sdxl_unet, (128, 128))  # 1024² images


def test_sdxl_has_seventy_self_attention_layers_at_two_sizes(sdxl_layers):
    own = [x for x in sdxl_layers if not x.is_cross]
    assert len(own) == 70 and len(sdxl_layers) == 140
    assert sorted({x.size for x in sdxl_layers}) == [(32, 32), (64, 64)]  # no attention at 128²


def test_local_blend_uses_the_maps_at_one_32nd_of_the_image_side(sdxl_layers):
    sdxl = types.SimpleNamespace(family="SDXL", image_size=1024)
    sd = types.SimpleNamespace(family="SD", image_size=768)
    assert blend_side(LocalBlend("a", "b"), sdxl) == 32
    assert blend_side(LocalBlend("a", "b"), sd) == SD_BLEND_SIDE == 16  # the reference's 16², any size
    assert blend_side(LocalBlend("a", "b", resolution=8), sdxl) == 8
    chosen = _blend_layers(sdxl_layers, blend_side(LocalBlend("a", "b"), sdxl))
    assert {x.size for x in chosen} == {(32, 32)} and all(x.is_cross for x in chosen)
    # the encoder's and the decoder's 32² cross-attention layers: 2 × 10 + 3 × 10
    assert {x.module.split(".attentions")[0] for x in chosen} == {"down_blocks.2", "up_blocks.0"}
    assert len(chosen) == 50


def test_masactrl_keeps_the_references_start_layer_on_sdxl(sdxl_layers):
    chosen = MasaCtrl().controlled_layers(sdxl_layers)
    assert [x.index for x in chosen] == list(range(10, 70))  # the reference's SDXL mode: 10 … 69
    assert MasaCtrl().resolved_start_layer(16) == 10  # SD 1.x/2.x
    assert MasaCtrl().resolved_start_layer(8) == 5  # other UNets: the same fraction as 10 of 16


def test_pnp_layers_on_sdxl(sdxl_unet, sdxl_layers):
    # the first decoder block with attention, its second ResNet: 32² of 1024², as SD's 16² of 512²
    assert reference_feature_layer(sdxl_unet) == "up_blocks.0.resnets.1"
    chosen = PnP().controlled_layers(sdxl_layers)
    decoder = [x for x in sdxl_layers if not x.is_cross and x.part == "up"]
    assert len(decoder) == 36 and [x.decoder_index for x in chosen] == list(range(1, 36))


def _live_tensor_bytes() -> int:
    import gc
    import warnings

    gc.collect()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                    total += obj.untyped_storage().nbytes()
            except Exception:  # noqa: BLE001 - objects that refuse introspection are not ours
                continue
    return total


class _Census(P2P):
    def plan(self, *args):
        plan = super().plan(*args)

        def after_step(i, latents):
            self.census.append(_live_tensor_bytes())
            return latents

        plan.after_step = after_step
        return plan


def test_direct_p2p_memory_is_flat_over_the_steps_on_tiny_xl(image):
    """Peak memory grows with the batch, not with steps × layers: the live tensors after each
    step of a Direct + P2P (LocalBlend, reweight) edit stay flat on tiny-xl."""
    xl = pyinv.Editor.from_pretrained("tiny-xl")
    inv = xl.invert(image, "a photo of a red ball", method="direct", steps=12)
    control = _Census(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0})
    control.census = []
    xl.edit(inv, "a photo of a blue cube", control=control)
    steady = control.census[2:]
    assert len(steady) == 10 and max(steady) - min(steady) < 16 * 1024, control.census
