"""Load test of the editing service: concurrent clients against a local ``pyinv serve``.

    # the measurement (demo model, 1, 4 and 16 clients, then 16 clients over a queue of 4)
    python benchmarks/load_test.py --clients 1,4,16 --overload --markdown \\
        --json benchmarks/results/load-demo-cpu.json --plot benchmarks/results/load-demo-cpu.png
    # a quick check on the tiny model
    python benchmarks/load_test.py --model tiny --clients 1,4 --sessions 4 --steps 3

For each client count a fresh server is started (``python -m pyinv serve --quiet`` on a free
port of 127.0.0.1, with a new empty cache directory, so no inversion is cached from an
earlier run) and, once ``/readyz`` answers, one untimed warm-up session runs. Then that
many clients, concurrently, each run sessions until ``--sessions`` have been started (or
``--time-cap`` seconds have passed: no new session starts after it, and the row says so).
A session uploads its own image (the example image with a small per-session colour shift
and offset, so its content-addressed id is new), inverts it (Direct Inversion, ``--steps``,
no PSNR pass), then makes 3 P2P edits of it one after the other, one target each. The
server is stopped with SIGTERM at the end and must exit. ``--sessions`` defaults to
max(8, 2 × clients): every client runs at least two sessions (and one client eight), and a multiple of the client
count keeps all of them busy to the end of the run (no tail with fewer clients).

A request answered 503 is counted (with its ``Retry-After``) and retried after that wait,
``--max-retries`` times at most; any other non-2xx answer, a transport error or a timeout is
an error (the session stops). A request's latency runs from its first attempt to its
answer, Retry-After waits included; a session's from its upload to its last edit.
Throughput is what was done over the run's wall time (first request to last answer). The
server's memory (VmRSS of the process and its children) is sampled every 0.5 s, with the
kernel's high-water mark (VmHWM) at the end; the queue depth is sampled from ``/metrics``.
``--overload`` adds a run of 16 clients over ``--queue-size 4``: refusals (503 with
Retry-After), not timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from pyinv.reports import write_json  # noqa: E402

SOURCE = "a red circle on a blue background"
TARGETS = (
    "a green circle on a blue background",
    "a yellow circle on a blue background",
    "a red square on a blue background",
)
EXAMPLE = os.path.join(ROOT, "examples", "red-circle.png")
LOCAL_HOSTS = ("127.0.0.1", "localhost")
KINDS = ("invert", "edit")
MIB = 1 << 20
SAMPLE_S = 0.5
#: A stopped server's exit codes: uvicorn, once it has shut down gracefully on SIGTERM,
#: raises the signal again, so the process ends "killed by SIGTERM" (-15), or 0.
CLEAN_EXIT = (0, -signal.SIGTERM)


@dataclass(frozen=True)
class Plan:
    """One run: ``clients`` concurrent clients doing ``sessions`` sessions in all."""

    clients: int
    sessions: int
    steps: int = 10
    edits: int = 3
    time_cap_s: float = 600.0
    max_retries: int = 30
    request_timeout_s: float = 330.0
    warmup: int = 1


@dataclass
class Tally:
    """What the clients of one run saw."""

    latency: dict[str, list[float]] = field(default_factory=lambda: {"invert": [], "edit": [], "session": []})
    sessions_done: int = 0
    sessions_failed: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    retry_after: set[float] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    cached: int = 0
    max_batch_targets: int = 0
    max_batch_edits: int = 0
    time_capped: bool = False


# ---------------------------------------------------------------------- inputs
def session_images(count: int, path: str = EXAMPLE) -> list[bytes]:
    """``count`` distinct PNGs: the example image, its colours shifted by -3 … 3 levels and
    rolled by a pixel every 7 sessions (so every upload has its own id)."""
    import numpy as np
    from PIL import Image

    base = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    side = base.shape[1]
    out = []
    for i in range(count):
        shifted = np.clip(base + (i % 7) - 3, 0, 255)
        roll = i // 7
        shifted = np.roll(shifted, (roll // side % side, roll % side), axis=(0, 1))
        buf = io.BytesIO()
        Image.fromarray(shifted.astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def check_local(url: str) -> str:
    """``url`` when its host is this machine (127.0.0.1 or localhost); anything else is refused."""
    host = urlsplit(url).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(f"the load test runs against 127.0.0.1 or localhost only, not {host!r}")
    return url


# ---------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {"n": len(values)}
    for q in (50, 95, 99):
        out[f"p{q}"] = percentile(values, q)
    out["max"] = max(values) if values else None
    return out


# ---------------------------------------------------------------------- the server's memory and metrics
def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{name}/stat") as f:
                    after_name = f.read().rpartition(")")[2].split()
                if int(after_name[1]) == pid:
                    kids.append(int(name))
    return kids


def memory(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM in bytes, summed over ``pid`` and its descendants (``None``: gone)."""
    total = {"rss": 0, "hwm": 0}
    todo, seen = [pid], 0
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        seen += 1
        total["rss"] += int(fields.get("VmRSS", "0 kB").split()[0]) << 10
        total["hwm"] += int(fields.get("VmHWM", "0 kB").split()[0]) << 10
        todo.extend(_children(p))
    return total if seen else None


def scrape(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{labels}': value}``."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


class Sampler:
    """Samples the server's memory and queue depth every :data:`SAMPLE_S` seconds."""

    def __init__(self, http, pid: int | None):
        self.http, self.pid = http, pid
        self.peak_rss = 0
        self.max_queue = 0.0
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        while True:
            self.sample_memory()
            with contextlib.suppress(Exception):
                metrics = scrape((await self.http.get("/metrics")).text)
                self.max_queue = max(self.max_queue, metrics.get("pyinv_queue_depth", 0.0))
            await asyncio.sleep(SAMPLE_S)

    def sample_memory(self) -> dict[str, int] | None:
        mem = memory(self.pid) if self.pid else None
        if mem:
            self.peak_rss = max(self.peak_rss, mem["rss"])
        return mem

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ---------------------------------------------------------------------- the clients
def retry_after(response) -> float:
    """The answer's ``Retry-After`` in seconds (1 s when missing or a date), at most 60."""
    try:
        return min(max(float(response.headers.get("retry-after", "1")), 0.0), 60.0)
    except ValueError:
        return 1.0


async def request(kind: str, send: Callable[[], Awaitable[Any]], plan: Plan, tally: Tally) -> dict | None:
    """Send (and on 503 resend after Retry-After) one request: its JSON answer, or ``None``
    after recording the error."""
    import httpx

    start = time.perf_counter()
    for attempt in range(plan.max_retries + 1):
        try:
            response = await send()
        except httpx.HTTPError as exc:
            tally.errors.append(f"{kind}: {type(exc).__name__}: {exc!r}")
            return None
        if response.status_code != 503:
            break
        wait = retry_after(response)
        tally.refused[kind] += 1
        tally.retry_after.add(wait)
        if attempt == plan.max_retries:
            tally.errors.append(f"{kind}: still 503 after {plan.max_retries} retries")
            return None
        await asyncio.sleep(wait)
    try:
        body = response.json() if response.is_success else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        tally.errors.append(f"{kind}: HTTP {response.status_code}: {response.text[:200]}")
        return None
    tally.latency[kind].append(time.perf_counter() - start)
    return body


async def session(http, image: bytes, plan: Plan, tally: Tally) -> None:
    """Upload and invert ``image``, then ``plan.edits`` P2P edits of it, one after the other."""
    start = time.perf_counter()
    fields = {"source_prompt": SOURCE, "method": "direct", "steps": str(plan.steps), "psnr": "false"}
    files = {"image": ("session.png", image, "image/png")}
    inv = await request("invert", lambda: http.post("/v1/inversions", data=fields, files=files), plan, tally)
    if inv is None or "id" not in inv:
        tally.sessions_failed += 1
        return
    tally.cached += bool(inv.get("cached"))
    for k in range(plan.edits):
        body = {"inversion_id": inv["id"], "targets": [TARGETS[k % len(TARGETS)]], "control": "p2p"}
        out = await request("edit", lambda body=body: http.post("/v1/edits", json=body), plan, tally)
        if out is None or len(out.get("images", ())) != 1:
            if out is not None:
                tally.errors.append("edit: not one image for one target")
            tally.sessions_failed += 1
            return
        tally.max_batch_targets = max(tally.max_batch_targets, int(out.get("batch_targets", 0)))
        tally.max_batch_edits = max(tally.max_batch_edits, int(out.get("batch_edits", 0)))
    tally.latency["session"].append(time.perf_counter() - start)
    tally.sessions_done += 1


async def client(http, images: list[bytes], claim: Callable[[], int | None], plan: Plan, tally: Tally, deadline):
    """One client: sessions one after another, while there are sessions left and time."""
    while (index := claim()) is not None:
        if time.perf_counter() >= deadline:
            tally.time_capped = True
            return
        await session(http, images[index], plan, tally)


def batch_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The UNet batches of the run from ``/metrics`` (``pyinv_batch_size``: targets per batch)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith("pyinv_batch_size_")}
    batches = int(delta.get("pyinv_batch_size_count", 0))
    buckets = {k.split('le="')[1].rstrip('"}'): int(v) for k, v in delta.items() if 'le="' in k}
    mean = delta.get("pyinv_batch_size_sum", 0.0) / batches if batches else None
    return {"batches": batches, "mean_targets": mean, "targets_le": buckets}


async def measure(url: str, plan: Plan, pid: int | None = None) -> dict[str, Any]:
    """Run ``plan`` against the service at ``url`` (this machine only); ``pid``: the server's
    process, whose memory is sampled. One result row."""
    import httpx

    check_local(url)
    images = session_images(plan.sessions + plan.warmup)
    limits = httpx.Limits(max_connections=plan.clients + 4, max_keepalive_connections=plan.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=plan.request_timeout_s, limits=limits) as http:
        server = (await http.get("/v1/models")).json()["models"][0]
        warm = Tally()
        for image in images[plan.sessions :]:
            await session(http, image, plan, warm)
        if warm.errors:
            raise RuntimeError(f"the warm-up session failed: {warm.errors[0]}")
        before = scrape((await http.get("/metrics")).text)
        tally = Tally()
        pending = iter(range(plan.sessions))
        claim = lambda: next(pending, None)
        async with Sampler(http, pid) as sampler:
            start_mem = sampler.sample_memory()
            start = time.perf_counter()
            deadline = start + plan.time_cap_s
            await asyncio.gather(*(client(http, images, claim, plan, tally, deadline) for _ in range(plan.clients)))
            wall = time.perf_counter() - start
            end_mem = sampler.sample_memory()
        after = scrape((await http.get("/metrics")).text)
    return row(plan, tally, wall, server, batch_metrics(before, after), sampler, start_mem, end_mem)


def row(plan: Plan, tally: Tally, wall: float, server, batches, sampler: Sampler, start_mem, end_mem) -> dict:
    """The result row of one run."""
    inversions, edits = len(tally.latency["invert"]), len(tally.latency["edit"])
    mib = lambda value: value / MIB if value else None
    return {
        "clients": plan.clients,
        "sessions_planned": plan.sessions,
        "sessions_done": tally.sessions_done,
        "sessions_failed": tally.sessions_failed,
        "time_capped": tally.time_capped,
        "requests": inversions + edits,
        "inversions": inversions,
        "edits": edits,
        "cached_inversions": tally.cached,
        "errors": len(tally.errors),
        "error_samples": tally.errors[:5],
        "refused_503": sum(tally.refused.values()),
        "refused_503_by_kind": dict(tally.refused),
        "retry_after_s": sorted(tally.retry_after),
        "wall_s": wall,
        "edits_per_s": edits / wall if wall else None,
        "sessions_per_s": tally.sessions_done / wall if wall else None,
        "latency_s": {kind: summary(values) for kind, values in tally.latency.items()},
        "max_batch_targets": tally.max_batch_targets,
        "max_batch_edits": tally.max_batch_edits,
        "unet_batches": batches,
        "max_queue_depth_sampled": sampler.max_queue,
        "rss_mib": {
            "start": mib(start_mem and start_mem["rss"]),
            "end": mib(end_mem and end_mem["rss"]),
            "peak_sampled": mib(sampler.peak_rss),
            "hwm": mib(end_mem and end_mem["hwm"]),
        },
        "server": server,
    }


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m pyinv serve`` in a subprocess on a free port of 127.0.0.1, with a fresh
    cache directory; its output goes to a log file there."""

    def __init__(
        self,
        model: str,
        queue_size: int,
        extra: Sequence[str] = (),
        ready_timeout_s: float = 600.0,
        threads: int | None = None,
    ):
        self.model, self.queue_size, self.extra = model, queue_size, list(extra)
        self.ready_timeout_s, self.threads = ready_timeout_s, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> Server:
        self._dir = tempfile.TemporaryDirectory(prefix="pyinv-load-")
        cache = os.path.join(self._dir.name, "inversions")
        cmd = [sys.executable, "-m", "pyinv", "serve", "--model", self.model, "--port", str(self.port)]
        cmd += ["--cache-dir", cache, "--queue-size", str(self.queue_size), "--quiet", *self.extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)  # torch's intra-op threads
        self._log_path = os.path.join(self._dir.name, "server.log")
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self._dir.name)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 2000) -> str:
        with open(self._log_path, errors="replace") as f:
            return f.read()[-chars:]

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}) before ready:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {self.ready_timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM, then wait for the exit (killed if it takes longer than ``timeout_s``): its code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"the server did not exit within {timeout_s:g} s of SIGTERM") from None
        self._dir.cleanup()
        return self.proc.returncode


def run_once(args: argparse.Namespace, clients: int, queue_size: int, mode: str) -> dict[str, Any]:
    """One run on a fresh server: the row, with the server's exit code."""
    sessions = args.sessions or max(8, 2 * clients)
    plan = Plan(clients, sessions, steps=args.steps, time_cap_s=args.time_cap, max_retries=args.max_retries)
    extra = []
    for name in ("device", "dtype", "backend"):
        if getattr(args, name):
            extra += [f"--{name}", getattr(args, name)]
    if args.max_batch_targets is not None:
        extra += ["--max-batch-targets", str(args.max_batch_targets)]
    server = Server(args.model, queue_size, extra, args.ready_timeout, args.server_threads).start()
    try:
        result = asyncio.run(measure(server.url, plan, server.pid))
    finally:
        code = server.stop()
    clean = code in CLEAN_EXIT
    if not clean:
        print(f"warning: the server exited with {code} after SIGTERM", file=sys.stderr)
    return {"mode": mode, "queue_size": queue_size, **result, "server_exit_code": code, "server_exit_clean": clean}


# ---------------------------------------------------------------------- output
def _f(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's throughput against the 1-client run's (``None`` without one)."""
    one = next((r["edits_per_s"] for r in rows if r["mode"] == "clients" and r["clients"] == 1), None)
    for r in rows:
        r["x_one_client"] = r["edits_per_s"] / one if one and r["edits_per_s"] is not None else None


def _lat(r: dict[str, Any], kind: str) -> str:
    lat = r["latency_s"][kind]
    return "/".join(_f(lat[q]) for q in ("p50", "p95", "p99"))


HEADER = (
    f"{'mode':8s} {'clients':>7s} {'queue':>5s} {'sessions':>8s} {'requests':>8s} {'edits/s':>7s} {'sess/s':>6s} "
    f"{'x1':>5s} {'invert p50/95/99 s':>18s} {'edit p50/95/99 s':>18s} {'session p50/95/99 s':>20s} "
    f"{'batch':>5s} {'err':>3s} {'503':>4s} {'RSS start/peak/end MiB':>22s}"
)


def table_line(r: dict[str, Any]) -> str:
    rss = r["rss_mib"]
    sessions = f"{r['sessions_done']}/{r['sessions_planned']}" + ("*" if r["time_capped"] else "")
    mem = "/".join(_f(rss[k], ".0f") for k in ("start", "hwm", "end"))
    return (
        f"{r['mode']:8s} {r['clients']:7d} {r['queue_size']:5d} {sessions:>8s} {r['requests']:8d} "
        f"{_f(r['edits_per_s']):>7s} {_f(r['sessions_per_s']):>6s} {_f(r.get('x_one_client')):>5s} "
        f"{_lat(r, 'invert'):>18s} {_lat(r, 'edit'):>18s} {_lat(r, 'session'):>20s} "
        f"{r['max_batch_targets']:5d} {r['errors']:3d} {r['refused_503']:4d} {mem:>22s}"
    )


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The README's table: one line per run."""
    columns = ["clients", "sessions", "edits/s", "× one client", "edit p50/p95/p99 s", "session p50 s"]
    columns += ["errors", "503s", "peak RSS MiB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        who = f"{r['clients']}" + (f" (queue {r['queue_size']})" if r["mode"] == "overload" else "")
        sessions = f"{r['sessions_done']}" + (" (time cap)" if r["time_capped"] else "")
        lines.append(
            f"| {who} | {sessions} | {_f(r['edits_per_s'])} | {_f(r.get('x_one_client'))} | {_lat(r, 'edit')} "
            f"| {_f(r['latency_s']['session']['p50'])} | {r['errors']} | {r['refused_503']} "
            f"| {_f(r['rss_mib']['hwm'], '.0f')} |"
        )
    return lines


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Throughput and edit latency (p50/p95/p99) against the number of clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in rows if r["mode"] == "clients"), key=lambda r: r["clients"])
    xs = [r["clients"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r["edits_per_s"] for r in runs], "o-", label="edits/s")
    left.plot(xs, [r["sessions_per_s"] for r in runs], "s--", label="sessions/s")
    left.set(xlabel="concurrent clients", ylabel="per second", title="throughput")
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        right.plot(xs, [r["latency_s"]["edit"][q] for r in runs], style, label=q)
    right.set(xlabel="concurrent clients", ylabel="seconds", title="edit latency")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON report: the settings, provenance (device, threads, versions, commit) and the rows."""
    import torch

    from pyinv.provenance import provenance

    settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "markdown")}
    settings.update(edits_per_session=Plan(1, 1).edits, method="direct", control="p2p", psnr=False, source=SOURCE,
                    targets=list(TARGETS), sessions_default="max(8, 2 x clients)", argv=list(argv))  # fmt: skip
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"benchmark": "serve-load", "settings": settings, "provenance": provenance(device), "rows": rows}


# ---------------------------------------------------------------------- command line
def client_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("give positive client counts, e.g. 1,4,16")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="model the server runs (default demo)")
    p.add_argument("--device", default=None, help="the server's --device")
    p.add_argument("--dtype", default=None, help="the server's --dtype")
    p.add_argument("--backend", default=None, help="the server's --backend")
    p.add_argument("--server-threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    p.add_argument("--clients", type=client_counts, default=[1, 4, 16], help="client counts, one run each (1,4,16)")
    p.add_argument("--sessions", type=int, default=None, help="sessions per run (default max(8, 2 x clients))")
    p.add_argument("--steps", type=int, default=10, help="inversion and edit steps (default 10)")
    p.add_argument("--queue-size", type=int, default=16, help="the server's --queue-size (default 16)")
    p.add_argument(
        "--max-batch-targets", type=int, default=None, help="the server's --max-batch-targets (1: no batching)"
    )
    p.add_argument("--time-cap", type=float, default=600.0, help="seconds after which no session starts (600)")
    p.add_argument("--max-retries", type=int, default=30, help="retries of a request answered 503 (30)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz (600)")
    p.add_argument("--overload", action="store_true", help="also run 16 clients over a queue of 4")
    p.add_argument("--overload-clients", type=int, default=16)
    p.add_argument("--overload-queue", type=int, default=4)
    p.add_argument("--json", default=None, metavar="PATH", help="write rows, settings and provenance")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of throughput and edit latency (matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the README table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = [(n, args.queue_size, "clients") for n in args.clients]
    if args.overload:
        runs.append((args.overload_clients, args.overload_queue, "overload"))
    print(HEADER, flush=True)
    rows = []
    for clients, queue_size, mode in runs:
        rows.append(run_once(args, clients, queue_size, mode))
        add_ratios(rows)
        print(table_line(rows[-1]), flush=True)
    print("(sessions done/planned, * = time cap; batch: most targets in one UNet batch; RSS peak = VmHWM)")
    failed = sum(r["errors"] for r in rows) + sum(not r["server_exit_clean"] for r in rows)
    for r in rows:
        for message in r["error_samples"]:
            print(f"error ({r['mode']}, {r['clients']} clients): {message}", file=sys.stderr)
    if args.markdown:
        print("\n".join(markdown(rows)))
    if args.json:
        write_json(args.json, report(rows, args, sys.argv[1:] if argv is None else argv))
    if args.plot:
        plot(rows, args.plot, f"pyinv serve, {args.model} model, {args.steps} steps")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
