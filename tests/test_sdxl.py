"""Stable Diffusion XL on the ``tiny-xl`` preset: the packed embeddings, the UNet split, every
method and controller through the existing paths, folders, the CLI and saved inversions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_err
from control_reference import ExplicitMasaCtrl, ExplicitP2P, ExplicitPnP

import pyinv
from pyinv import P2P, LocalBlend, MasaCtrl, PnP, cli
from pyinv.backends.flat import flat_unet
from pyinv.backends.ort import OnnxRuntimeBackend
from pyinv.backends.trt import TensorRTBackend
from pyinv.errors import PyinvError
from pyinv.inversion import get_method
from pyinv.models import fingerprints_match, load_model, save_model
from pyinv.presets import TINY_XL_DIMS
from pyinv.sdxl import AddedConditions, added_conditions

SRC = "a photo of a red ball"
TGT = "a photo of a blue cube"
STEPS = 6
D1, D2, P = TINY_XL_DIMS["hidden_1"], TINY_XL_DIMS["hidden_2"], TINY_XL_DIMS["pooled"]


@pytest.fixture(scope="module")
def xl() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny-xl")


@pytest.fixture(scope="module")
def xl64() -> pyinv.Editor:
    return pyinv.Editor.from_pretrained("tiny-xl", dtype="fp64")


@pytest.fixture(scope="module")
def direct_inv(xl, image):
    return xl.invert(image, SRC, method="direct", steps=STEPS)


# ---------------------------------------------------------------------- the model
def test_preset_is_sdxl_shaped(xl):
    m = xl.model
    assert m.family == "SDXL" and m.image_size == 32 and m.latent_size == 16
    assert m.text_encoder_2 is not None and m.tokenizer_2 is not None and m.force_zeros_for_empty_prompt
    assert m.embedding_shape == (78, D1 + D2)
    assert m.added_conditions == AddedConditions(tokens=77, pooled_dim=P, time_ids=(32.0, 32.0, 0.0, 0.0, 32.0, 32.0))
    assert m.unet.config.addition_embed_type == "text_time"
    assert m.unet.config.down_block_types[0] == "DownBlock2D"  # no attention at the first level, as SDXL
    assert pyinv.Editor.from_pretrained("tiny").model.family == "SD"


def test_packed_embeddings(xl):
    m = xl.model
    prompts = [SRC, TGT, ""]
    emb = m.encode_prompts(prompts)
    assert emb.shape == (3, 78, D1 + D2) and emb.dtype == torch.float32
    ids = m._token_ids(m.tokenizer, prompts)
    with torch.no_grad():
        one = m.text_encoder(ids, output_hidden_states=True)
        two = m.text_encoder_2(ids, output_hidden_states=True)
    hidden = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
    assert torch.equal(emb[:2, :77], hidden[:2])
    assert torch.equal(emb[:2, 77, :P], two.text_embeds[:2])
    assert torch.all(emb[:, 77, P:] == 0)
    assert torch.all(emb[2] == 0)  # "" → zeros (force_zeros_for_empty_prompt), hidden and pooled
    m.force_zeros_for_empty_prompt = False
    try:
        plain = m.encode_prompts([""])
    finally:
        m.force_zeros_for_empty_prompt = True
    assert torch.equal(plain[0, :77], hidden[2]) and plain.abs().max() > 0


def test_unet_split_equals_the_diffusers_call(xl):
    m = xl.model
    emb = m.encode_prompts([SRC, TGT])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    got = m.unet_forward(z, 501, emb)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    with torch.no_grad():
        want = m.unet(
            z,
            torch.tensor(501),
            encoder_hidden_states=emb[:, :77],
            added_cond_kwargs={"text_embeds": emb[:, 77, :P], "time_ids": time_ids},
        ).sample
    assert torch.equal(got, want)
    grad = m.unet_forward_grad(z, 501, emb)  # NTI/PTI's call splits the same way
    assert torch.equal(grad.detach(), want)


def test_time_ids_follow_the_image_size():
    m = load_model("tiny-xl")  # its own model: the image size changes
    emb = m.encode_prompts([SRC])
    m.image_size = 48  # as `pyinv benchmark --resolution 48` sets it
    assert m.added_conditions.time_ids == (48.0, 48.0, 0.0, 0.0, 48.0, 48.0)
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m.unet(
            z,
            torch.tensor(301),
            encoder_hidden_states=emb[:, :77],
            added_cond_kwargs={
                "text_embeds": emb[:, 77, :P],
                "time_ids": torch.tensor([[48.0, 48.0, 0, 0, 48.0, 48.0]]),
            },
        ).sample
        stale = m.unet(
            z,
            torch.tensor(301),
            encoder_hidden_states=emb[:, :77],
            added_cond_kwargs={
                "text_embeds": emb[:, 77, :P],
                "time_ids": torch.tensor([[32.0, 32.0, 0, 0, 32.0, 32.0]]),
            },
        ).sample
    assert not torch.equal(want, stale)  # the ids matter to the call
    assert torch.equal(m.unet_forward(z, 301, emb), want)
    assert torch.equal(m.unet_forward_grad(z, 301, emb).detach(), want)


def test_a_pooled_embedding_wider_than_the_hidden_states_is_refused(xl):
    m = xl.model
    with pytest.raises(PyinvError, match="wider than the hidden states"):
        added_conditions(m.unet, m.text_encoder_2, 77, P - 1, 32)
    with pytest.raises(PyinvError, match="second text encoder"):
        added_conditions(m.unet, None, 77, D1 + D2, 32)
    assert added_conditions(pyinv.Editor.from_pretrained("tiny").model.unet, None, 77, 32, 32) is None


# ---------------------------------------------------------------------- methods
@pytest.mark.parametrize(
    "method, options",
    [
        ("ddim", {}),
        ("direct", {}),
        ("negative-prompt", {}),
        ("null-text", {"inner_steps": 2}),
        ("prompt-tuning", {}),
        ("edit-friendly", {"seed": 0}),
        ("edict", {}),
    ],
)
def test_every_method_inverts_and_edits(xl, image, method, options):
    inv = xl.invert(image, SRC, method=method, steps=4, **options)
    out = xl.edit(inv, TGT)
    assert out.latents.shape == (1, 4, 16, 16) and torch.isfinite(out.latents).all()
    assert out.images[0].size == (32, 32)


def test_direct_source_branch_returns_z0(xl, direct_inv):
    out = xl.edit(direct_inv, TGT, with_source=True)
    assert (out.source_latents - direct_inv.z0).abs().max().item() <= 1e-5
    assert rel_err(out.latents, out.source_latents) > 1e-4


def test_edit_friendly_reconstructs(xl, image):
    inv = xl.invert(image, SRC, method="edit-friendly", steps=STEPS, seed=0)
    out = xl.edit(inv, SRC, guidance=inv.guidance, with_source=True, skip=0)
    assert rel_err(out.source_latents, inv.z0) < 1e-8
    assert rel_err(out.latents, inv.z0) < 1e-8


def test_edit_friendly_takes_the_ledits_sdxl_settings(xl, image):
    from diffusers import DDIMScheduler

    algo = get_method("edit-friendly")
    assert algo.defaults_for("SDXL") == {"steps": 57, "guidance": 5.0, "inversion_guidance": 3.5}
    assert (
        algo.defaults_for(None)
        == algo.defaults_for("SD")
        == {"steps": 100, "guidance": 15.0, "inversion_guidance": 3.5}
    )
    assert get_method("direct").defaults_for(xl.model) == get_method("direct").defaults_for("SD")
    inv = xl.invert(image, SRC, method="edit-friendly", seed=0)
    assert inv.num_steps == 57 and inv.guidance == 3.5
    # LEDITS++'s EF-DDPM path (a DDIMScheduler, "leading" spacing) at int(50 · 1.15) = 57 steps
    ddim = DDIMScheduler.from_config(xl.model.scheduler_config, timestep_spacing="leading")
    ddim.set_timesteps(57)
    assert list(inv.schedule["timesteps"]) == ddim.timesteps.tolist()
    xl.model.reset_counters()
    out = xl.edit(inv, TGT, seed=0)
    assert xl.model.unet_calls == 50  # LEDITS++'s 50 inverted steps: 7 of 57 skipped
    assert torch.equal(out.latents, xl.edit(inv, TGT, guidance=5.0, seed=0).latents)
    assert not torch.equal(out.latents, xl.edit(inv, TGT, guidance=15.0, seed=0).latents)


def test_null_text_loss_falls_and_optimises_the_pooled_row(xl, image):
    inv = xl.invert(image, SRC, method="null-text", steps=STEPS, guidance=7.5)
    first, last = inv.stats["loss_first"], inv.stats["loss_last"]
    assert sum(b < a for a, b in zip(first, last, strict=True)) >= STEPS - 1 and sum(last) < sum(first)
    nulls = inv["null_embeddings"]
    assert nulls.shape == (STEPS, 78, D1 + D2)
    assert nulls[:, 77, :P].abs().max() > 0  # the null's pooled row moved away from zeros
    ddim = xl.invert(image, SRC, method="ddim", steps=STEPS)
    err_nti = rel_err(xl.reconstruct(inv, guidance=7.5).source_latents, inv.z0)
    err_ddim = rel_err(xl.reconstruct(ddim, guidance=7.5).source_latents, ddim.z0)
    assert err_nti < err_ddim


def test_edict_is_exact(xl, image):
    inv = xl.invert(image, SRC, method="edict", steps=8, guidance=3.0, strength=1.0)
    assert rel_err(xl.reconstruct(inv, guidance=3.0).source_latents, inv.z0) < 1e-8


# ---------------------------------------------------------------------- controllers
CONTROLS = {
    "refine+blend": (
        lambda: P2P(edit="refine", blend=LocalBlend("ball", "cube", threshold=0.97)),
        lambda: ExplicitP2P(edit="refine", blend=LocalBlend("ball", "cube", threshold=0.97)),
    ),
    "replace": (lambda: P2P(edit="replace"), lambda: ExplicitP2P(edit="replace")),
    "masactrl": (lambda: MasaCtrl(start_step=2), lambda: ExplicitMasaCtrl(start_step=2)),
    "pnp": (lambda: PnP(), lambda: ExplicitPnP()),
}


@pytest.mark.parametrize("case", list(CONTROLS))
def test_controlled_edits_match_the_explicit_reference(xl64, image, case):
    """The processors see the 77 text tokens (the pooled row is split off before the UNet):
    the fused controllers equal the explicit-softmax reference in fp64, and change the edit."""
    inv = xl64.invert(image, SRC, method="direct", steps=STEPS)
    fast, explicit = CONTROLS[case]
    out = xl64.edit(inv, TGT, control=fast(), with_source=True)
    ref = xl64.edit(inv, TGT, control=explicit())
    assert (out.latents - ref.latents).abs().max() <= 1e-10
    assert (out.latents - xl64.edit(inv, TGT).latents).abs().max() > 1e-6
    assert (out.source_latents - inv.z0).abs().max() <= 1e-10


# ---------------------------------------------------------------------- files, backends, CLI
def test_saved_inversion_loads_back_and_not_on_sd(xl, direct_inv, image, tmp_path):
    path = tmp_path / "xl.safetensors"
    nti = xl.invert(image, SRC, method="null-text", steps=3, inner_steps=1)
    for inv, name in ((direct_inv, "direct"), (nti, "nti")):
        file = tmp_path / f"{name}.safetensors"
        inv.save(file)
        again = xl.load_inversion(file)
        assert torch.allclose(xl.edit(again, TGT).latents, xl.edit(inv, TGT).latents, atol=1e-6)
    direct_inv.save(path)
    sd = pyinv.Editor.from_pretrained("tiny")
    with pytest.raises(PyinvError, match="made with model 'tiny-xl'"):
        sd.edit(sd.load_inversion(path), TGT)
    sd_inv = sd.invert(image, SRC, method="direct", steps=3)
    with pytest.raises(PyinvError, match="made with model 'tiny'"):
        xl.edit(sd_inv, TGT)


def test_diffusers_folder_loads_like_the_preset(xl, direct_inv, tmp_path):
    """A folder laid out as SDXL checkpoints are (``model_index.json`` naming
    StableDiffusionXLPipeline, text_encoder_2/, tokenizer_2/) loads as the preset does."""
    m = xl.model
    folder = tmp_path / "sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer"):
        getattr(m, part).save_pretrained(folder / part)
    m.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(m.scheduler_config))
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_model(str(folder))
    assert loaded.family == "SDXL" and loaded.image_size == 32 and loaded.force_zeros_for_empty_prompt
    assert fingerprints_match(loaded.fingerprint(), m.fingerprint())
    # the loaded projection rounds its last bits differently (≤ 4e-7 on the pooled row)
    assert torch.allclose(loaded.encode_prompts([SRC]), m.encode_prompts([SRC]), atol=1e-6)
    assert rel_err(pyinv.Editor(loaded).edit(direct_inv, TGT).latents, xl.edit(direct_inv, TGT).latents) < 1e-8
    # pyinv's own writer gives a folder that loads back the same
    save_model(m, str(tmp_path / "saved"))
    assert fingerprints_match(load_model(str(tmp_path / "saved")).fingerprint(), m.fingerprint())
    # force_zeros off in the index: another model for saved inversions
    index["force_zeros_for_empty_prompt"] = False
    (folder / "model_index.json").write_text(json.dumps(index))
    other = load_model(str(folder))
    assert not other.force_zeros_for_empty_prompt
    assert not fingerprints_match(other.fingerprint(), m.fingerprint())


def test_exporting_backends_accept_sdxl(xl, monkeypatch):
    """The onnxruntime and tensorrt backends export SDXL's split (tests/test_backend_onnxruntime_sdxl.py)."""
    for backend in (OnnxRuntimeBackend, TensorRTBackend):
        backend().check_model(xl.model)
        backend().check_model(pyinv.Editor.from_pretrained("tiny").model)
    monkeypatch.setattr(OnnxRuntimeBackend, "check", lambda self, device, dtype: None)  # without onnxruntime
    m = load_model("tiny-xl", backend="onnxruntime")
    assert m.family == "SDXL" and m.backend.name == "onnxruntime"


@pytest.mark.parametrize("dtype", ["fp16", "fp64"])
def test_the_split_in_other_dtypes_equals_the_diffusers_call(dtype):
    """The pooled row goes to the UNet in at least float32 (what its concatenation with the
    float32 time embedding promotes it to anyway): the same outputs as the row in the model's dtype."""
    m = load_model("tiny-xl", dtype=dtype)
    emb = m.encode_prompts([SRC, TGT]).to(m.dtype)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(m.dtype)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2, dtype=m.dtype)
    with torch.no_grad():
        want = m.unet(
            z,
            torch.tensor(501),
            encoder_hidden_states=emb[:, :77],
            added_cond_kwargs={"text_embeds": emb[:, 77, :P], "time_ids": time_ids},
        ).sample
    got = m.unet_forward(z, 501, emb)  # in the latents' dtype
    assert want.dtype == m.dtype and torch.equal(got, want.to(got.dtype))


def test_compile_backend_and_flat_call_split_the_embeddings(xl, direct_inv, monkeypatch):
    """The compile backend (traced here with the cheap aot_eager backend) and the flat call
    its CUDA graphs replay both split SDXL's packed embeddings as the eager call does."""
    m = xl.model
    emb = m.encode_prompts([SRC, TGT])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want = m.unet_forward(z, 301, emb)
    with torch.no_grad():
        flat = flat_unet(m.unet, None, m.added_conditions)(z, torch.tensor(301), emb)[0]
    assert torch.equal(flat, want)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="aot_eager", **kw))
    try:
        ed = pyinv.Editor.from_pretrained("tiny-xl", backend="compile")
        got = ed.edit(direct_inv, TGT).latents
    finally:
        torch._dynamo.reset()
    assert rel_err(got, xl.edit(direct_inv, TGT).latents) < 1e-8


def test_cli_edit_on_tiny_xl(tmp_path, image, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "in.png"
    image.save(source)
    out = tmp_path / "out.png"
    argv = ["edit", str(source), "--model", "tiny-xl", "--source", SRC, "--target", TGT, "--steps", "2", "-q"]
    assert cli.main([*argv, "--control", "p2p", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (32, 32)
