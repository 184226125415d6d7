"""The demo model's architecture: a small text-to-image diffusion model in pixel space.

Built only from the field's model classes, so the engine treats it like any Stable
Diffusion checkpoint:

- a :class:`diffusers.UNet2DConditionModel` on ``(B, 3, 32, 32)`` pixels in ``[-1, 1]``
  (no VAE), three resolutions 32² → 16² → 8², cross-attention to the prompt at 16² and 8²
  and in the middle block, self-attention next to every cross-attention;
- a :class:`transformers.CLIPTextModel` (2 layers, width 64) over a CLIP BPE tokenizer
  that knows the world's words (:data:`DEMO_WORDS`) as whole tokens, padded to 77 tokens;
- v-prediction on the cosine ("squaredcos_cap_v2") noise schedule. At 32² pixels a
  schedule must reach a low signal-to-noise ratio to hide an image's layout; the cosine
  schedule does (ᾱ ≈ 1e-3 at t = 980), and predicting v keeps the model's target bounded
  where ε-prediction would divide by √ᾱ.
"""

from __future__ import annotations

from typing import Any

from ..presets import _text_encoder, tiny_tokenizer
from .world import COLORS, SHAPES

#: every word a caption of the world uses
DEMO_WORDS: tuple[str, ...] = ("a", "on", "background", *COLORS, *SHAPES)

#: the demo model's noise schedule and parameterisation (a diffusers DDIMScheduler config)
DEMO_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "v_prediction",
    "trained_betas": None,
}

IMAGE_SIZE = 32


def demo_unet(channels: tuple[int, int, int] = (64, 96, 128), head_dim: int = 32):
    """The demo UNet, randomly initialised (the caller seeds torch)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=[c // head_dim for c in channels],
        norm_num_groups=16,
    )


def demo_tokenizer():
    """CLIP BPE tokenizer over :data:`DEMO_WORDS` (other text falls back to byte symbols)."""
    return tiny_tokenizer(DEMO_WORDS)


def demo_text_encoder(tokenizer):
    """A 2-layer CLIP text encoder of width 64 (randomly initialised; the caller seeds torch)."""
    return _text_encoder(tokenizer, hidden=64, layers=2, heads=4, inter=256)
