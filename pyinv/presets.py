"""Built-in model presets, all offline: the trained demo model and small random-weight models.

- ``demo``: a small text-to-image model of the shapes world (``"a red circle on a blue
  background"``), 32×32 pixels, trained by :mod:`pyinv.shapes.train`; its weights ship
  with pyinv. The default model of the command line: edits with it are real edits.
- ``tiny``: a few-hundred-kilobyte latent diffusion model (UNet2DConditionModel,
  AutoencoderKL, CLIPTextModel) with a tokenizer written locally from a small vocabulary.
  Random weights (seeded, so every build is identical); for tests and smoke runs.
- ``tiny-v``: the same with ``prediction_type="v_prediction"``.
- ``tiny-pixel``: the same UNet on 3-channel pixels, no VAE.
- ``tiny-xl``: a small Stable Diffusion XL-shaped model (seeded random weights, 32×32
  images): a UNet with SDXL's added conditions (``addition_embed_type="text_time"``) and its
  block structure (no attention in the first level, more transformer layers deeper), a tiny
  AutoencoderKL, two text encoders (``CLIPTextModel``, and ``CLIPTextModelWithProjection`` for
  the pooled embedding) sharing the tiny tokenizer, and SDXL base's scheduler config.
- ``sd15-arch``: the Stable Diffusion 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text
  encoder) with random weights, for latency work (latency does not depend on weights).
- ``sdxl-arch``: Stable Diffusion XL base 1.0's architecture (its UNet, VAE, CLIP ViT-L/14 and
  OpenCLIP ViT-bigG/14 text encoders, about 3.5 B parameters) with random weights, 1024²
  images, for latency work. Built directly in the dtype and on the device asked for, so a
  bf16/fp16 build never holds an fp32 copy (≈ 7 GB instead of 14 GB).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .diffusers_folder import load_diffusers
from .errors import PyinvError

#: Words the tiny tokenizer knows as whole tokens; any other text falls back to characters.
TINY_WORDS = """
a an the of on in with and at by to photo picture painting drawing image sketch render
red orange yellow green blue purple pink white black grey gray brown golden silver
circle square triangle star heart shape ball box cube
cat dog bird horse cow sheep lion tiger bear rabbit fox mouse fish duck owl panda monkey
man woman boy girl person child face hat glasses shirt dress
tree flower grass forest mountain river lake sea beach sky cloud sun moon snow rain field
house car bike boat road city street bridge room table chair cup bowl apple banana cake
background sitting standing running small big large tiny old new bright dark happy
wooden metal glass stone plastic paper style oil watercolor cartoon
""".split()

#: Scheduler config shared by the tiny presets (SD 1.x's, including its own steps_offset=1).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

#: Stable Diffusion XL base's scheduler config (an EulerDiscreteScheduler's); pyinv reads
#: its betas and spacing into its DDIM schedule (:func:`pyinv.schedule.make_schedule`).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "trained_betas": None,
    "use_karras_sigmas": False,
}

#: tiny-xl's widths: the two encoders' hidden sizes (D1, D2), the pooled size P, the time ids'
#: embedding size
TINY_XL_DIMS = {"hidden_1": 32, "hidden_2": 48, "pooled": 32, "time_embed": 8}

TINY_SEED = 20231004
OUTPUT_SCALE = 0.3


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def write_tiny_tokenizer(folder: str, words: Sequence[str] = TINY_WORDS) -> None:
    """Write a CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``) that knows ``words``
    (default :data:`TINY_WORDS`) as whole tokens.

    The vocabulary holds every byte symbol (alone and word-final), every whole word and the
    prefixes its left-to-right merges create, then the start/end tokens. Other text falls
    back to those symbols, as CLIP's tokenizer does for rare words.
    """
    chars = _byte_alphabet()
    vocab: dict[str, None] = dict.fromkeys(chars + [c + "</w>" for c in chars])
    merges: dict[str, None] = {}
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges[f"{pieces[0]} {pieces[1]}"] = None
            joined = pieces[0] + pieces[1]
            vocab[joined] = None
            pieces = [joined] + pieces[2:]
    vocab["<|startoftext|>"] = None
    vocab["<|endoftext|>"] = None
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_tokenizer(words: Sequence[str] = TINY_WORDS):
    """A CLIP tokenizer over ``words``, written to a temporary folder and loaded from it."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="pyinv-tok-") as folder:
        write_tiny_tokenizer(folder, words)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _text_encoder(
    tokenizer,
    hidden: int,
    layers: int,
    heads: int,
    inter: int,
    vocab: int | None = None,
    projection: int | None = None,
    act: str = "quick_gelu",
):
    """A CLIP text encoder; with ``projection`` one with a projection of that size
    (``CLIPTextModelWithProjection``, SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    extra = {} if projection is None else {"projection_dim": projection}
    config = CLIPTextConfig(
        **extra,
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def _tiny_unet(channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=3.0,
    )


def build_tiny(prediction_type: str = "epsilon", pixel: bool = False) -> dict[str, Any]:
    """Components of the tiny model (seeded random weights): unet, vae, text encoder, tokenizer."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = _tiny_unet(3 if pixel else 4)
        # A random UNet's prediction is far rougher in (z, t) than a trained one's; a small
        # output layer keeps the tiny model's probability-flow ODE smooth enough that the
        # inversion properties (round trips, drift under guidance) show as they do on SD.
        with torch.no_grad():
            unet.conv_out.weight.mul_(OUTPUT_SCALE)
            unet.conv_out.bias.mul_(OUTPUT_SCALE)
        vae = None if pixel else _tiny_vae()
        text_encoder = _text_encoder(tokenizer, hidden=32, layers=2, heads=4, inter=64)
    scheduler = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": scheduler,
        "image_size": 16 if pixel else 32,
    }


def build_tiny_xl() -> dict[str, Any]:
    """Components of the tiny SDXL-shaped model (seeded random weights; see the module
    docstring): unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2."""
    from diffusers import UNet2DConditionModel

    dims = TINY_XL_DIMS
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),  # heads per level, as SDXL's config counts them
            cross_attention_dim=dims["hidden_1"] + dims["hidden_2"],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=dims["time_embed"],
            projection_class_embeddings_input_dim=6 * dims["time_embed"] + dims["pooled"],
            norm_num_groups=8,
        )
        with torch.no_grad():  # as in build_tiny: a smooth enough random model
            unet.conv_out.weight.mul_(OUTPUT_SCALE)
            unet.conv_out.bias.mul_(OUTPUT_SCALE)
        vae = _tiny_vae()
        text_encoder = _text_encoder(tokenizer, hidden=dims["hidden_1"], layers=2, heads=4, inter=64)
        text_encoder_2 = _text_encoder(
            tokenizer, hidden=dims["hidden_2"], layers=2, heads=4, inter=96, projection=dims["pooled"], act="gelu"
        )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,  # real SDXL's pads with "!": no word moves
        "scheduler_config": dict(SDXL_SCHEDULER_CONFIG),
        "force_zeros_for_empty_prompt": True,
        "image_size": 32,
    }


def build_sd15_arch() -> dict[str, Any]:
    """SD 1.5's architecture with seeded random weights (about 1.07 B parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = _text_encoder(tokenizer, hidden=768, layers=12, heads=12, inter=3072, vocab=49408)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": dict(SD_SCHEDULER_CONFIG),
        "image_size": 512,
    }


#: SDXL base 1.0's UNet (the config of stabilityai/stable-diffusion-xl-base-1.0's ``unet/``)
SDXL_BASE_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "layers_per_block": 2,
}

#: SDXL base 1.0's VAE (its ``vae/`` config: SD's VAE shape with SDXL's scaling factor)
SDXL_BASE_VAE: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Modules made inside are made in ``dtype`` on ``device`` (the default dtype and device
    for the duration), under the tiny presets' seed."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(TINY_SEED)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def build_sdxl_arch(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict[str, Any]:
    """SDXL base 1.0's architecture with seeded random weights (about 3.5 B parameters: UNet
    2.57 B, OpenCLIP bigG 0.69 B, CLIP ViT-L 0.12 B, VAE 0.08 B), made in ``dtype`` on
    ``device``. fp64 is made in fp32 (and converted by the loader)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    build_dtype = torch.float32 if dtype == torch.float64 else dtype
    tokenizer = tiny_tokenizer()
    with _building(build_dtype, device):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        vae = AutoencoderKL(**SDXL_BASE_VAE)
        text_encoder = _text_encoder(tokenizer, hidden=768, layers=12, heads=12, inter=3072, vocab=49408)
        text_encoder_2 = _text_encoder(
            tokenizer, hidden=1280, layers=32, heads=20, inter=5120, vocab=49408, projection=1280, act="gelu"
        )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler_config": dict(SDXL_SCHEDULER_CONFIG),
        "force_zeros_for_empty_prompt": True,
        "image_size": 1024,
    }


#: where the demo model's trained weights live (a diffusers folder shipped in the package)
DEMO_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes", "demo")


def load_demo() -> dict[str, Any]:
    """The demo model (:mod:`pyinv.shapes`): trained weights shipped with pyinv, loaded offline."""
    if not os.path.isfile(os.path.join(DEMO_FOLDER, "unet", "config.json")):
        raise PyinvError(
            f"the demo model's weights are missing from {DEMO_FOLDER}; reinstall pyinv or train them "
            "(python -m pyinv.shapes.train, see the README)"
        )
    parts = load_diffusers(DEMO_FOLDER)
    parts["image_size"] = 32
    return parts


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "demo": load_demo,
    "tiny": build_tiny,
    "tiny-v": lambda: build_tiny(prediction_type="v_prediction"),
    "tiny-pixel": lambda: build_tiny(pixel=True),
    "tiny-xl": build_tiny_xl,
    "sd15-arch": build_sd15_arch,
    "sdxl-arch": build_sdxl_arch,
}

#: presets built directly in the dtype and on the device the model loads with (their builder
#: takes ``dtype`` and ``device``): too large to make in fp32 first
SIZED_PRESETS = frozenset({"sdxl-arch"})
