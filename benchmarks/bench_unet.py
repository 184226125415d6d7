"""Time one UNet call per backend and batch size: the part of an edit each backend speeds up.

    python benchmarks/bench_unet.py                                   # demo model, CPU
    python benchmarks/bench_unet.py --model sd15-arch --device cuda --dtype fp16 \\
        --backend eager --backend compile --backend onnxruntime --batch 1 --batch 2 --batch 3 \\
        --batch 4 --json benchmarks/results/unet-h200.json

For each backend × batch ``R`` the UNet runs on ``(R, C, h, w)`` latents (the model's size,
or ``--resolution``) with ``(R, 77, D)`` embeddings, plain (no control) and under the P2P
control of a two-branch edit when ``R`` is that edit's layout size; ``--warmup`` untimed
calls (compilation, export, CUDA-graph capture happen there), then ``--repeats`` timed ones,
synchronising the device around each. Reports the median, the interquartile range and the
peak memory (CUDA: max allocated during the timed calls), with provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyinv  # noqa: E402
from pyinv.backends import BACKENDS, Backend, get_backend  # noqa: E402
from pyinv.errors import PyinvError  # noqa: E402
from pyinv.provenance import provenance  # noqa: E402
from pyinv.reports import write_json  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(model, backend, inputs, warmup: int, repeats: int) -> dict:
    device = model.device
    sample, t, emb, control = inputs
    for _ in range(warmup):
        with torch.no_grad():
            backend.run(model, sample, t, emb, control)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            backend.run(model, sample, t, emb, control)
        _sync(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "iqr_ms": 1e3 * (q[2] - q[0]), "peak_mb": peak}


def plain_inputs(model, rows: int, size: int):
    c = model.unet.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, c.in_channels, size, size, generator=g).to(model.device, model.dtype)
    emb = model.encode_prompts(["a photo of a cat"] * rows).to(model.dtype)
    return sample, torch.tensor(500, device=model.device), emb, None


class Recording(Backend):
    """Runs the UNet on ``inner`` and keeps the controlled calls' inputs."""

    def __init__(self, inner: Backend):
        self.inner, self.traced, self.calls = inner, inner.traced, []

    def run(self, model, sample, t, emb, control):
        if control is not None:
            self.calls.append((sample.clone(), t.clone(), emb.clone(), control))
        return self.inner.run(model, sample, t, emb, control)


def p2p_inputs(model):
    """The UNet call of a Direct Inversion + P2P edit's third step (source pinned: R = 3)."""
    from pyinv.bench.speed import source_image

    recording = Recording(model.backend)
    editor = pyinv.Editor(pyinv.DiffusionModel(**{**vars(model), "backend": recording}))
    inv = editor.invert(source_image(model.image_size), "a red circle on a blue background", steps=4)
    editor.edit(inv, "a green circle on a blue background", control=pyinv.P2P())
    return recording.calls[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--backend", action="append", choices=list(BACKENDS))
    p.add_argument("--batch", action="append", type=int)
    p.add_argument("--resolution", type=int, default=None, help="latent side (default: the model's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    backends = args.backend or ["eager", "compile", "onnxruntime"]
    batches = args.batch or [1, 2, 3, 4]
    model = pyinv.load_model(args.model, device=args.device, dtype=args.dtype)
    size = args.resolution or model.latent_size
    rows = []
    for name in backends:
        try:
            backend = get_backend(name)
            backend.check(model.device, model.dtype)
            model_on = pyinv.DiffusionModel(**{**vars(model), "backend": backend, "_fp32_copies": {}})
        except PyinvError as exc:
            rows.append({"backend": name, "error": str(exc)})
            print(f"{name}: {exc}")
            continue
        cases = [(f"plain R={r}", plain_inputs(model_on, r, size)) for r in batches]
        if size == model.latent_size:
            cases.append(("p2p R=3 (direct+p2p edit)", p2p_inputs(model_on)))
        for label, inputs in cases:
            try:
                row = time_calls(model_on, backend, inputs, args.warmup, args.repeats)
            except (PyinvError, RuntimeError) as exc:
                row = {"error": " ".join(str(exc).split())}
            row.update(backend=name, call=label, rows=int(inputs[0].shape[0]))
            rows.append(row)
            if "error" in row:
                print(f"{name:12s} {label:28s} error: {row['error'][:200]}", flush=True)
            else:
                peak = f"  peak {row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else ""
                print(f"{name:12s} {label:28s} {row['median_ms']:9.2f} ms  IQR {row['iqr_ms']:.2f}{peak}", flush=True)
    report = {
        "benchmark": "unet-call",
        "settings": {
            "model": args.model,
            "dtype": args.dtype,
            "latent_size": size,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "provenance": provenance(model.device),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, report)
    else:
        print(json.dumps(report["settings"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
