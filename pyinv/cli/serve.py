"""``pyinv serve``: the editing service (FastAPI + uvicorn) over one model held hot; with
``--ray``, the same app on several replicas under Ray Serve (:mod:`pyinv.serve.ray_app`)."""

from __future__ import annotations

import argparse
import contextlib
import os

from ..argtypes import positive_float, positive_int
from ..errors import PyinvError
from . import common
from .common import add_model_args, runtime

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    """Register ``pyinv serve`` on the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "serve",
        help="run the editing service (HTTP API)",
        description="Serve inversions and edits over HTTP: POST /v1/inversions, POST /v1/edits, "
        "GET/DELETE /v1/inversions/{id}, GET /v1/models, /healthz, /readyz, /metrics, and a web page at /; the "
        "API is described at /docs and /openapi.json. Needs pip install 'pyinv[serve]'.",
        epilog="examples:\n  pyinv serve                                  # demo model on 127.0.0.1:8000\n"
        "  PYINV_API_KEY=secret pyinv serve --model ./sd15 --device cuda --dtype fp16 --host 0.0.0.0\n"
        "  pyinv serve --ray --replicas 4 --model ./sd15 --dtype fp16   # 4 replicas, one GPU each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="where inversions are kept across restarts (default $PYINV_CACHE_DIR/inversions, "
        "else ~/.cache/pyinv/inversions)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $PYINV_API_KEY; none: no auth)",
    )
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser calls from ORIGIN")
    p.add_argument("--queue-size", type=positive_int, default=16, help="jobs that may wait (more: 503)")
    p.add_argument(
        "--max-batch-targets",
        type=positive_int,
        default=8,
        help="most target prompts (or images, for inversions) concurrent requests may share "
        "UNet calls with (default 8; 1: no batching)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait for its job")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)")
    p.add_argument("--max-targets", type=positive_int, default=8, help="most target prompts per edit")
    p.add_argument("--max-steps", type=positive_int, default=100, help="most steps per inversion")
    p.add_argument("--disk-gb", type=float, default=2.0, help="size cap of the on-disk inversion cache")
    r = p.add_argument_group(
        "scale-out with Ray Serve (pip install 'pyinv[ray]')",
        "Several replicas of the service, each a process with its own model (one GPU each on "
        "CUDA), behind Ray Serve's HTTP proxy on --host:--port. The replicas share the --cache-dir "
        "folder. Without --ray-address a local Ray instance is started (and stopped at the end).",
    )
    r.add_argument("--ray", action="store_true", help="serve the app on Ray Serve replicas")
    r.add_argument("--replicas", type=positive_int, metavar="N", help="how many replicas (default 1)")
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (host:port, ray://host:port, or 'auto': the one running here)",
    )
    r.add_argument(
        "--num-cpus-per-replica",
        type=positive_float,
        metavar="C",
        help="CPUs Ray reserves for each replica (default 1; a fraction packs replicas onto a core)",
    )
    r.add_argument(
        "--max-replicas",
        type=positive_int,
        metavar="N",
        help="autoscale: let Ray vary the replicas between --min-replicas and N (instead of --replicas)",
    )
    r.add_argument("--min-replicas", type=positive_int, metavar="N", help="autoscale: fewest replicas (default 1)")
    r.add_argument(
        "--target-ongoing-requests",
        type=positive_float,
        metavar="R",
        help="autoscale: requests in flight per replica that Ray aims at (default 2)",
    )
    add_model_args(p, f"model preset, diffusers folder or hub id (default: {common.DEFAULT_MODEL})")
    p.set_defaults(func=cmd_serve)


RAY_FLAGS = (
    ("replicas", "--replicas"),
    ("ray_address", "--ray-address"),
    ("num_cpus_per_replica", "--num-cpus-per-replica"),
    ("max_replicas", "--max-replicas"),
    ("min_replicas", "--min-replicas"),
    ("target_ongoing_requests", "--target-ongoing-requests"),
)


def check_ray_args(args: argparse.Namespace) -> None:
    """The Ray flags' usage errors, before anything is imported or started."""
    given = [flag for name, flag in RAY_FLAGS if getattr(args, name, None) is not None]
    if not getattr(args, "ray", False):
        if given:
            raise common.UsageError(f"{given[0]} needs --ray (scale-out with Ray Serve)")
        return
    if args.max_replicas is None:
        for name, flag in (
            ("min_replicas", "--min-replicas"),
            ("target_ongoing_requests", "--target-ongoing-requests"),
        ):
            if getattr(args, name) is not None:
                raise common.UsageError(f"{flag} is an autoscaling setting: give --max-replicas too")
    else:
        if args.replicas is not None:
            raise common.UsageError("give --replicas (a fixed count) or --max-replicas (autoscaling), not both")
        if args.min_replicas is not None and args.min_replicas > args.max_replicas:
            raise common.UsageError(
                f"--min-replicas {args.min_replicas} is more than --max-replicas {args.max_replicas}"
            )
    device = (args.device or "").strip().lower()
    if device.startswith("cuda:"):
        raise common.UsageError(
            "with --ray each replica gets a GPU of its own from Ray: give --device cuda, not cuda:N"
        )


def default_store_root() -> str:
    base = os.environ.get("PYINV_CACHE_DIR")
    if base:
        return os.path.join(os.path.expanduser(base), "inversions")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pyinv", "inversions")


def cmd_serve(args: argparse.Namespace) -> int:
    """``pyinv serve``: load the model, warm it, serve until SIGTERM / Ctrl-C (in-flight
    requests are finished first); with ``--ray``, the same on Ray Serve replicas."""
    check_ray_args(args)
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.engine import Engine
        from ..serve.store import InversionStore
    except ImportError as exc:
        raise PyinvError(f"pyinv serve needs the serve extra: pip install 'pyinv[serve]' ({exc})") from None
    if not 0 < args.port < 65536:
        raise common.UsageError(f"--port must be 1-65535, not {args.port}")
    sizes = (("--timeout", args.timeout), ("--max-upload-mb", args.max_upload_mb), ("--disk-gb", args.disk_gb))
    for flag, value in sizes:
        if not value > 0:
            raise common.UsageError(f"{flag} must be positive")
    api_key = args.api_key or os.environ.get("PYINV_API_KEY") or None
    if args.host not in LOOPBACK and api_key is None and not args.quiet:
        print(f"pyinv serve: warning: listening on {args.host} without an API key: anyone who reaches it can use it")
    if args.ray:
        return serve_on_ray(args, api_key)
    device, dtype = runtime(args)
    backend = getattr(args, "backend", None)
    limits = limits_of(args)
    store = InversionStore(args.cache_dir or default_store_root(), disk_bytes=int(args.disk_gb * (1 << 30)))

    def load():  # not common.load_editor: its Ctrl-C handler can only be set on the main thread
        from ..api import Editor

        return Editor.from_pretrained(
            args.model or common.DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            progress=False,
            backend=backend,
            vae=getattr(args, "vae", None),
        )

    # the model is loaded (on the engine's worker thread, which runs it) and warmed before the
    # server listens, so a bad --model is a one-line error here, not a failed app start-up
    engine = Engine(load, store, limits)
    with common.interrupt_exits():
        engine.start()
    app = create_app(engine, api_key=api_key, cors_origins=args.cors_origin, start=False)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def limits_of(args: argparse.Namespace):
    """The request limits the arguments ask for."""
    from ..serve.engine import Limits

    return Limits(
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_targets=args.max_targets,
        max_steps=args.max_steps,
        request_timeout_s=args.timeout,
        queue_size=args.queue_size,
        max_batch_targets=args.max_batch_targets,
    )


RAY_MISSING = "pyinv serve --ray needs the ray extra: pip install 'pyinv[ray]'"


class _Stopped(Exception):
    """SIGTERM or Ctrl-C while the replicas start."""


def serve_on_ray(args: argparse.Namespace, api_key: str | None) -> int:
    """``pyinv serve --ray``: start a local Ray instance (or join ``--ray-address``), run the
    replicas behind Ray Serve's proxy on ``--host:--port``, wait for SIGTERM / Ctrl-C, then
    take the application down (all of Serve, and Ray, when they were started here). A signal
    while the replicas start stops them too."""
    import signal
    import threading

    with common.interrupt_exits():
        try:
            import ray
            from ray import serve

            from ..serve import ray_app
        except ImportError:
            raise PyinvError(RAY_MISSING) from None
    from ..models import parse_dtype

    parse_dtype(args.dtype)  # a bad --dtype is refused here, not in every replica
    model = args.model or common.DEFAULT_MODEL
    init = {"address": args.ray_address or "local"}
    if args.quiet:
        init.update(log_to_driver=False, logging_level="warning")
    try:
        ray.init(**init)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise PyinvError(f"cannot start or join Ray ({args.ray_address or 'local'}): {exc}") from None
    # from here on SIGTERM and Ctrl-C stop the service (ray.init installed a handler of its own)
    stop, starting = threading.Event(), threading.Event()
    starting.set()

    def on_signal(signum, frame):
        stop.set()
        if starting.is_set():
            starting.clear()
            raise _Stopped

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        device = (args.device or ("cuda" if gpus else "cpu")).strip().lower()
        if device not in ("cpu", "cuda"):
            raise PyinvError(f"unsupported device {args.device!r} for Ray replicas; use cpu or cuda")
        if device == "cuda" and not gpus:
            raise PyinvError("--device cuda: the Ray cluster has no GPU")
        settings = ray_app.ReplicaSettings(
            model=model,
            device=device,
            dtype=args.dtype,
            backend=getattr(args, "backend", None),
            vae=getattr(args, "vae", None),
            store_root=args.cache_dir or default_store_root(),
            disk_bytes=int(args.disk_gb * (1 << 30)),
            limits=limits_of(args),
            api_key=api_key,
            cors_origins=tuple(args.cors_origin or ()),
            # as many torch threads as the CPUs Ray reserves (a replica's CPUs are not pinned)
            threads=None if device == "cuda" else max(1, int(args.num_cpus_per_replica or 1)),
        )
        autoscaling = None
        if args.max_replicas is not None:
            autoscaling = ray_app.Autoscaling(
                min_replicas=args.min_replicas or 1,
                max_replicas=args.max_replicas,
                target_ongoing_requests=args.target_ongoing_requests or 2.0,
            )
        app = ray_app.application(settings, args.replicas or 1, args.num_cpus_per_replica, autoscaling)
        try:
            ray_app.deploy(app, args.host, args.port)
        except (RuntimeError, ray.exceptions.RayError) as exc:
            detail = ray_app.failure_reason() or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PyinvError(f"the replicas did not start: {detail}") from None
        starting.clear()
        if not args.quiet and not stop.is_set():
            count = f"{autoscaling.min_replicas}-{autoscaling.max_replicas}" if autoscaling else args.replicas or 1
            print(
                f"pyinv serve: {count} replica(s) of {model} on {device} under Ray Serve at "
                f"http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops)",
                flush=True,
            )
        while not stop.wait(1.0):
            pass
    except _Stopped:
        pass
    finally:
        starting.clear()
        try:
            if args.ray_address:  # a cluster shared with others: take down this application only
                with contextlib.suppress(Exception):
                    serve.delete(ray_app.APP_NAME)
            else:
                with contextlib.suppress(Exception):
                    serve.shutdown()
            ray.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0
