"""Train the demo model on the shapes world: seeded, resumable, with a loss curve.

    python -m pyinv.shapes.train runs/demo --steps 12000          # train (resumes if stopped)
    python -m pyinv.shapes.train runs/demo --export pyinv/shapes/demo   # write the EMA weights

Every batch is a function of ``(seed, step)`` alone — scenes from :func:`sample_scene`
with seeds ``TRAIN_SEED_BASE + step·B + i``, noise, timesteps and caption dropout from a
generator seeded with ``(seed, step)`` — so a run stopped and resumed from a checkpoint
sees exactly the batches an uninterrupted run would.

Objective (v-prediction, arXiv 2202.00512): for an image ``x0`` and ``ε ~ N(0, I)`` at a
uniform timestep ``t``, ``z_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` and the target is
``v = √ᾱ_t ε − √(1−ᾱ_t) x0``. The loss is weighted by Min-SNR-γ (arXiv 2303.09556):
``w_t = min(SNR_t, γ) / (SNR_t + 1)`` with ``SNR_t = ᾱ_t / (1−ᾱ_t)``, γ = 5, which stops
the nearly-clean timesteps from dominating and speeds up training several-fold. A caption
is replaced by ``""`` with probability 0.1 so classifier-free guidance works. AdamW with
linear warm-up and cosine decay; the exported weights are an exponential moving average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from ..presets import write_tiny_tokenizer
from ..schedule import make_schedule
from .model import DEMO_SCHEDULER_CONFIG, DEMO_WORDS, IMAGE_SIZE, demo_text_encoder, demo_tokenizer, demo_unet
from .world import render, sample_scene

#: scene seeds of training batches start here (tests and benchmarks use small seeds)
TRAIN_SEED_BASE = 1_000_000_000
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """What defines a training run (a checkpoint only resumes under the same settings)."""

    steps: int = 12000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 300
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    channels: tuple[int, int, int] = (32, 64, 128)
    precision: str = "bf16"
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then cosine decay to ``final_lr_fraction · lr``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        low = self.final_lr_fraction
        return self.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))


def scene_batch(step: int, batch: int, side: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """The images ``(B, 3, side, side)`` in ``[-1, 1]`` and captions of training step ``step``."""
    scenes = [sample_scene(TRAIN_SEED_BASE + step * batch + i) for i in range(batch)]
    images = np.stack([np.asarray(render(scene, side), dtype=np.float32) for scene in scenes])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels.contiguous(), [scene.caption for scene in scenes]


def alphas_cumprod() -> torch.Tensor:
    """``ᾱ_t`` of the demo schedule for t = 0…999 (float64)."""
    return make_schedule(DEMO_SCHEDULER_CONFIG, 1, "checkpoint").alphas_cumprod


class Trainer:
    """The model, its EMA copy, the optimiser and the loss history of one run."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.tokenizer = demo_tokenizer()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        self.unet = demo_unet(config.channels)
        self.text_encoder = demo_text_encoder(self.tokenizer)
        torch.random.set_rng_state(gen_state)
        self.ema = {name: p.detach().clone() for name, p in self._named_parameters()}
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self._named_parameters()], lr=config.lr, weight_decay=config.weight_decay
        )
        self.step = 0
        self.losses: list[float] = []
        self.seconds = 0.0
        acp = alphas_cumprod().float()
        self.sqrt_a, self.sqrt_1ma = acp.sqrt(), (1 - acp).sqrt()
        snr = acp / (1 - acp)
        self.loss_weight = snr.clamp(max=config.snr_gamma) / (snr + 1)

    def _named_parameters(self):
        yield from (("unet." + n, p) for n, p in self.unet.named_parameters())
        yield from (("text_encoder." + n, p) for n, p in self.text_encoder.named_parameters())

    # ------------------------------------------------------------------ one step
    def loss_at(self, step: int) -> torch.Tensor:
        """The weighted v-prediction loss on the batch of ``step``."""
        cfg = self.config
        images, captions = scene_batch(step, cfg.batch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(images.shape, generator=gen)
        t = torch.randint(0, len(self.sqrt_a), (cfg.batch,), generator=gen)
        dropped = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, dropped.tolist(), strict=True)]
        a, s = self.sqrt_a[t].view(-1, 1, 1, 1), self.sqrt_1ma[t].view(-1, 1, 1, 1)
        noisy = a * images + s * noise
        target = a * noise - s * images
        ids = self.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            hidden = self.text_encoder(ids)[0]
            pred = self.unet(noisy, t, encoder_hidden_states=hidden).sample
        per_image = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (per_image * self.loss_weight[t]).mean()

    def train_step(self) -> float:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        loss = self.loss_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self._named_parameters()], 1.0)
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, p in self._named_parameters():
                self.ema[name].lerp_(p.detach(), 1 - decay)
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "step": self.step,
            "seconds": self.seconds,
            "losses": self.losses,
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema": self.ema,
            "optimizer": self.optimizer.state_dict(),
        }

    def save(self, run_dir: str) -> None:
        """Write the checkpoint atomically (a stopped save never spoils the previous one)."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, CHECKPOINT)
        torch.save(self.state(), path + ".tmp")
        os.replace(path + ".tmp", path)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(asdict(self.config), f, indent=2)
        write_loss_curve(self.losses, os.path.join(run_dir, "loss.png"))

    @classmethod
    def load(cls, run_dir: str, config: TrainConfig | None = None) -> Trainer:
        """Resume from ``run_dir``; ``config`` (when given) must match the checkpoint's,
        except ``steps``, which may be raised to train longer."""
        state = torch.load(os.path.join(run_dir, CHECKPOINT), map_location="cpu", weights_only=False)
        saved = _config_from_dict(state["config"])
        if config is not None:
            mismatched = [
                f.name
                for f in fields(TrainConfig)
                if f.name != "steps" and getattr(saved, f.name) != getattr(config, f.name)
            ]
            if mismatched:
                raise ValueError(
                    f"{run_dir} was trained with other settings ({', '.join(mismatched)}); use a new folder"
                )
            saved = config
        trainer = cls(saved)
        trainer.unet.load_state_dict(state["unet"])
        trainer.text_encoder.load_state_dict(state["text_encoder"])
        trainer.ema = state["ema"]
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step, trainer.losses, trainer.seconds = state["step"], state["losses"], state["seconds"]
        return trainer

    # ------------------------------------------------------------------ export
    def export(self, folder: str, dtype: torch.dtype = torch.float16) -> None:
        """Write the EMA weights as a diffusers folder (unet/, text_encoder/, tokenizer/, scheduler/)."""
        with torch.no_grad():
            for name, p in self._named_parameters():
                p.copy_(self.ema[name])
        os.makedirs(folder, exist_ok=True)
        self.unet.to(dtype).save_pretrained(os.path.join(folder, "unet"))
        self.text_encoder.to(dtype).save_pretrained(os.path.join(folder, "text_encoder"))
        portable_text_encoder_weights(os.path.join(folder, "text_encoder"))
        self.unet.float()
        self.text_encoder.float()
        self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        # vocab.json + merges.txt too: older transformers releases load CLIPTokenizer from those
        write_tiny_tokenizer(os.path.join(folder, "tokenizer"), DEMO_WORDS)
        os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(DEMO_SCHEDULER_CONFIG, f, indent=2)
        with open(os.path.join(folder, "training.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"config": asdict(self.config), "step": self.step, "train_seconds": round(self.seconds)}, f, indent=2
            )


def portable_text_encoder_weights(folder: str) -> None:
    """Store the CLIP text encoder's weights under the ``text_model.`` key prefix.

    transformers 5 writes ``CLIPTextModel`` weights without the prefix, which releases 4.x
    cannot load (they would silently start from random weights); both read the prefixed keys.
    """
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    if all(k.startswith("text_model.") for k in weights):
        return
    prefixed = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous() for k, v in weights.items()}
    save_file(prefixed, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


def _config_from_dict(values: dict[str, Any]) -> TrainConfig:
    values = dict(values)
    values["channels"] = tuple(values["channels"])
    return TrainConfig(**values)


def write_loss_curve(losses: list[float], path: str, window: int = 100) -> None:
    """A PNG of the loss per step and its running mean (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not losses:
        return
    values = np.asarray(losses)
    kernel = min(window, len(values))
    smooth = np.convolve(values, np.ones(kernel) / kernel, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(np.arange(len(values)), values, lw=0.5, alpha=0.3, label="loss")
    ax.plot(np.arange(kernel - 1, len(values)), smooth, lw=1.5, label=f"mean of {kernel} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("Min-SNR-weighted v loss")
    ax.set_title("demo model training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def train(
    run_dir: str, config: TrainConfig, checkpoint_every: int = 250, progress: bool = True, until: int | None = None
) -> Trainer:
    """Train until ``config.steps`` (or stop early at step ``until``, with a checkpoint),
    resuming from ``run_dir`` when it holds a checkpoint."""
    stop = config.steps if until is None else min(until, config.steps)
    if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        trainer = Trainer.load(run_dir, config)
    else:
        trainer = Trainer(config)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=trainer.step, disable=not progress, desc="train", unit="step")
    try:
        while trainer.step < stop:
            start = time.perf_counter()
            loss = trainer.train_step()
            trainer.seconds += time.perf_counter() - start
            bar.update(1)
            if trainer.step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(trainer.losses[-100:]):.4f}", lr=f"{config.lr_at(trainer.step):.1e}")
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {trainer.step}")
            if trainer.step % checkpoint_every == 0 or trainer.step == stop:
                trainer.save(run_dir)
    finally:
        bar.close()
    return trainer


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m pyinv.shapes.train", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="folder for the checkpoint, config.json and loss.png (resumed if present)")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"total training steps (default {defaults.steps})")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=defaults.precision,
        help="autocast precision of the forward pass (bf16 is fast on CPUs with AVX-512 BF16 or AMX)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--until", type=int, metavar="STEP", help="stop at this step (with a checkpoint); resume later")
    p.add_argument("--export", metavar="DIR", help="write the run's EMA weights as a diffusers folder and exit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export:
        if not os.path.isfile(os.path.join(args.run_dir, CHECKPOINT)):
            print(f"error: {args.run_dir} holds no {CHECKPOINT}", file=sys.stderr)
            return 2
        trainer = Trainer.load(args.run_dir)
        trainer.export(args.export)
        print(f"wrote {args.export} (step {trainer.step})")
        return 0
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, precision=args.precision)
    try:
        trainer = train(args.run_dir, config, checkpoint_every=args.checkpoint_every, until=args.until)
    except (ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    print(f"trained to step {trainer.step} in {trainer.seconds / 60:.1f} min; checkpoint in {args.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
