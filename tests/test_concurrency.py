"""Edits on one Editor at the same time: nothing in the shared model changes during an edit,
so each thread's edit equals the same edit run alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pyinv import P2P, LocalBlend, MasaCtrl, PnP

SRC = "a photo of a red ball"
STEPS = 8

#: name → (controller factory, target prompt)
JOBS = {
    "p2p+blend": (
        lambda: P2P(blend=LocalBlend("ball", "cube", threshold=0.97), reweight={"cube": 2.0}),
        "a photo of a blue cube",
    ),
    "masactrl": (lambda: MasaCtrl(start_step=1), "a photo of a green ball"),
    "pnp": (lambda: PnP(), "a photo of a red cube"),
    "p2p-replace, two targets": (lambda: P2P(edit="replace"), ["a photo of a blue ball", "a photo of a red cube"]),
}


@pytest.fixture(scope="module")
def inv(editor, image):
    return editor.invert(image, SRC, method="direct", steps=STEPS)


def _edit(editor, inv, name, control=None):
    make, target = JOBS[name]
    started = time.perf_counter()
    out = editor.edit_latents(inv, target, control=control if control is not None else make())
    return out, (started, time.perf_counter())


@pytest.mark.parametrize("rounds", [2])
def test_concurrent_edits_equal_the_same_edits_one_after_the_other(editor, inv, rounds):
    alone = {name: _edit(editor, inv, name)[0] for name in JOBS}
    barrier = threading.Barrier(len(JOBS))

    def job(name):
        barrier.wait()
        return _edit(editor, inv, name)

    for _ in range(rounds):
        with ThreadPoolExecutor(len(JOBS)) as pool:
            results = dict(zip(JOBS, pool.map(job, JOBS), strict=True))
        spans = [span for _, span in results.values()]
        assert max(s for s, _ in spans) < min(e for _, e in spans), "the edits did not run at the same time"
        for name, (out, _) in results.items():
            assert torch.equal(out.targets, alone[name].targets), name
            assert out.unet_calls == alone[name].unet_calls == STEPS
            assert out.unet_image_forwards == alone[name].unet_image_forwards
            assert out.batch_rows == alone[name].batch_rows


def test_one_controller_object_serves_concurrent_edits(editor, inv):
    control = P2P(blend=LocalBlend("ball", "cube", threshold=0.97))
    target = "a photo of a blue cube"
    alone = editor.edit_latents(inv, target, control=control).targets
    barrier = threading.Barrier(3)

    def job(_):
        barrier.wait()
        return editor.edit_latents(inv, target, control=control).targets

    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(job, range(3)))
    assert all(torch.equal(out, alone) for out in outs)


def test_a_half_precision_decode_that_overflows_uses_a_float32_copy(monkeypatch):
    """The fp32 redo of an overflowing half-precision decode runs on a float32 copy of the VAE:
    the model's own VAE never changes dtype (a concurrent decode would see it change)."""
    from pyinv.models import load_model

    model = load_model("tiny", dtype="bf16")
    vae = model.vae
    real_decode = type(vae).decode
    dtypes = []

    def overflowing_in_half(self, z, *args, **kwargs):
        dtypes.append((self.dtype, vae.dtype))  # the decoding module's and the model's own VAE's
        out = real_decode(self, z, *args, **kwargs)
        if self.dtype != torch.float32:
            out.sample.fill_(float("inf"))
        return out

    monkeypatch.setattr(type(vae), "decode", overflowing_in_half)
    z = torch.randn(1, model.latent_channels, model.latent_size, model.latent_size)
    image = model.decode(z)
    assert torch.isfinite(image).all()
    bf16, fp32 = torch.bfloat16, torch.float32
    assert dtypes == [(bf16, bf16), (fp32, bf16)] and vae.dtype == bf16
    copy = model.fp32_copy("vae")
    assert copy is not vae and copy.dtype == torch.float32 and model.fp32_copy("vae") is copy


def test_seeded_inversions_are_reproducible_while_other_threads_draw(editor, image):
    """A seeded EF-DDPM inversion draws its noise from a generator of its own: unseeded
    inversions running at the same time (drawing from torch's global generator) do not
    change it."""
    alone = editor.invert(image, SRC, method="edit-friendly", steps=6, seed=7)["xts"]
    barrier = threading.Barrier(4)

    def job(k):
        barrier.wait()
        seed = 7 if k % 2 == 0 else None
        return seed, editor.invert(image, SRC, method="edit-friendly", steps=6, seed=seed)["xts"]

    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(job, range(4)))
        assert all(torch.equal(xts, alone) for seed, xts in results if seed == 7)
        assert not any(torch.equal(xts, alone) for seed, xts in results if seed is None)


def test_a_seeded_draw_equals_the_global_generator_after_manual_seed():
    """Seeds give the numbers they gave when seeding set torch's global generator."""
    from pyinv.seeding import normal, seeded

    for seed in (0, 7, 2**64 - 1):
        with seeded(seed):
            ours = normal((3, 4, 5))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            assert torch.equal(ours, torch.randn(3, 4, 5))
