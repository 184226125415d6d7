"""What batching buys the service: N concurrent edits of one inversion, batched or not.

    python benchmarks/bench_serve_batching.py --json benchmarks/results/serve-batching-demo-cpu.json

The engine (no HTTP) holds the demo model; one image is inverted (Direct Inversion), then N
edits of it with P2P, each its own request from its own thread, are submitted while the
worker is busy (so they wait together), with ``max_batch_targets=1`` (one edit at a time)
and with the default (the waiting edits run as one batch). Reports the wall time until the
last answer, median of ``--repeats``, and the throughput in edits per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyinv  # noqa: E402
from pyinv.bench.speed import source_image  # noqa: E402
from pyinv.provenance import provenance  # noqa: E402
from pyinv.reports import write_json  # noqa: E402
from pyinv.serve.engine import Engine, Job, Limits  # noqa: E402
from pyinv.serve.store import InversionStore  # noqa: E402

TARGETS = [
    "a green circle on a blue background",
    "a yellow circle on a blue background",
    "a red square on a blue background",
]


def timed_round(engine: Engine, inv_id: str, n: int) -> float:
    release = threading.Event()
    hold = engine._submit(Job(release.wait)).future
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(engine.edit, inv_id, [TARGETS[i % len(TARGETS)]], "p2p") for i in range(n)]
        while engine.queue_depth < n:
            time.sleep(0.005)
        start = time.perf_counter()
        release.set()
        for f in futures:
            f.result()
        seconds = time.perf_counter() - start
    hold.result()
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--edits", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    editor = pyinv.Editor.from_pretrained(args.model)
    import io

    buf = io.BytesIO()
    source_image(editor.model.image_size).save(buf, format="PNG")
    rows = []
    for label, batch in (("one edit at a time", 1), ("batched", Limits().max_batch_targets)):
        limits = Limits(max_batch_targets=batch, queue_size=args.edits + 1)
        engine = Engine(editor, InversionStore(None), limits)
        engine.start(warm=False)
        try:
            inv_id = engine.invert(buf.getvalue(), "a red circle on a blue background", psnr=False)["id"]
            timed_round(engine, inv_id, args.edits)  # warm-up
            times = [timed_round(engine, inv_id, args.edits) for _ in range(args.repeats)]
        finally:
            engine.stop()
        median = statistics.median(times)
        rows.append({"mode": label, "max_batch_targets": batch, "seconds": times, "median_s": median,
                     "edits_per_s": args.edits / median})  # fmt: skip
        print(f"{label:20s} {args.edits} edits in {median:.2f} s  ({args.edits / median:.2f} edits/s)", flush=True)
    gain = rows[0]["median_s"] / rows[1]["median_s"]
    print(f"batching: {gain:.2f}x the throughput")
    if args.json:
        settings = {"model": args.model, "edits": args.edits, "repeats": args.repeats, "control": "p2p"}
        write_json(args.json, {"benchmark": "serve-batching", "settings": settings, "gain": gain,
                               "provenance": provenance(editor.model.device), "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
