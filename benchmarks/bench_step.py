"""Time the fused per-step op against the unfused PyTorch sequence, and against copy bandwidth.

    python benchmarks/bench_step.py                      # CPU: reference vs C++ (when built)
    python benchmarks/bench_step.py --device cuda --dtype fp16 --size 64 --size 128 \\
        --json benchmarks/results/step-h100.json

For each latent shape ``(B, C, H, W)`` and flag set, every usable implementation of
``guided_step`` runs with warm-up and repeats; the report gives the median time, the spread
(interquartile range), the bytes the op must move (every input map read once, the result
written once) and the achieved GB/s as a fraction of the machine's copy bandwidth, measured
here as ``dst.copy_(src)`` on a 256 MB buffer (2 × 256 MB moved). ``reference`` is the plain
PyTorch sequence (one kernel per elementwise op), the unfused baseline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyinv import ops  # noqa: E402
from pyinv.provenance import provenance  # noqa: E402

FLAG_SETS = {
    "ddim": {},
    "direct-pinned+blend": {"pin": True, "blend": True},
    "ddpm+offset": {"noise": True, "offset": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call, ``repeats`` samples of ``inner`` back-to-back calls each (CUDA
    events on a GPU, so launch gaps between samples are not counted; a clock elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            out.append((time.perf_counter() - start) / inner)
    return out


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted)."""
    n = megabytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, 3, 10)
    return 2 * src.numel() * 4 / statistics.median(times)


def step_inputs(shape, dtype, device, flags):
    gen = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    rand = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    kwargs = dict(
        latents=rand(*shape),
        out_uncond=rand(*shape),
        out_cond=rand(*shape),
        guidance=torch.full((B,), 7.5, device=device),
        alpha_t=0.3,
        alpha_s=0.4,
        v_prediction=False,
    )
    maps = 3
    if flags.get("noise"):
        kwargs.update(sigma=0.1, noise=rand(*shape))
        maps += 1
    if flags.get("offset"):
        kwargs["offset"] = rand(*shape)
        maps += 1
    if flags.get("pin"):
        kwargs["pin"] = rand(*shape)
        kwargs["pin_mask"] = torch.zeros(B, dtype=torch.bool, device=device)
        kwargs["pin_mask"][0] = True
        maps += 1
    extra = 0
    if flags.get("blend"):
        kwargs["blend_mask"] = torch.rand(B, 1, H, W, generator=gen).to(device=device, dtype=dtype)
        extra = B * H * W * kwargs["blend_mask"].element_size()
    item = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (maps + 1) * B * C * H * W * item + extra
    return kwargs, bytes_moved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 3, 4, 8)")
    p.add_argument("--size", type=int, action="append", help="latent sides (default 64: SD 1.5 at 512²)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    usable = ops.availability()["guided_step"]["usable"][device.type]
    bandwidth = copy_bandwidth(device)
    print(f"device {device.type}, {torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"implementations: {', '.join(usable)}")
    rows = []
    inner = 20 if device.type == "cuda" else 1
    for side, batch in itertools.product(args.size or [64], args.batch or [3, 4, 8]):
        shape = (batch, 4, side, side)
        for flag_name, flags in FLAG_SETS.items():
            kwargs, nbytes = step_inputs(shape, dtype, device, flags)
            results = {}
            for impl in usable:
                fn = ops.IMPLEMENTATIONS["guided_step"][impl]
                times = timed(lambda fn=fn, kw=kwargs: fn(**kw), device, 5, args.repeats, inner)
                q = statistics.quantiles(times, n=4)
                med = statistics.median(times)
                results[impl] = med
                rows.append(
                    {
                        "shape": list(shape),
                        "dtype": args.dtype,
                        "flags": flag_name,
                        "implementation": impl,
                        "median_ms": med * 1e3,
                        "iqr_ms": (q[2] - q[0]) * 1e3,
                        "bytes": nbytes,
                        "gb_per_s": nbytes / med / 1e9,
                        "fraction_of_copy": nbytes / med / bandwidth,
                    }
                )
            line = ", ".join(
                f"{impl} {t * 1e3:.3f} ms ({nbytes / t / 1e9:.1f} GB/s, {nbytes / t / bandwidth:.0%} of copy)"
                for impl, t in results.items()
            )
            speedups = [f"{impl} {results['reference'] / t:.1f}×" for impl, t in results.items() if impl != "reference"]
            print(
                f"{str(shape):>18} {flag_name:<20} {line}"
                + (f"; vs reference: {', '.join(speedups)}" if speedups else "")
            )
    # what the op's dispatch picks on this device (on a GPU: timed at its first call)
    ops.reset_dispatch()
    kwargs, _ = step_inputs((3, 4, 64, 64), dtype, device, FLAG_SETS["direct-pinned+blend"])
    ops.guided_step(**kwargs)
    info = ops.availability()["guided_step"]
    dispatch = {"active": info["active"][device.type], "measured_ms": info["measured"].get(device.type, {})}
    print(
        f"dispatch on {device.type}: {dispatch['active']}"
        + (f" (first-call timings, ms: {dispatch['measured_ms']})" if dispatch["measured_ms"] else "")
    )
    if args.json:
        payload = {
            "benchmark": "guided_step",
            **provenance(device),
            "settings": {"dtype": args.dtype, "repeats": args.repeats, "calls_per_sample": inner},
            "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "dispatch": dispatch,
            "rows": rows,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
