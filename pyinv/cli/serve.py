"""``pyinv serve``: the editing service (FastAPI + uvicorn) over one model held hot."""

from __future__ import annotations

import argparse
import os

from ..argtypes import positive_int
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
        "  PYINV_API_KEY=secret pyinv serve --model ./sd15 --device cuda --dtype fp16 --host 0.0.0.0",
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
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait for its job")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)")
    p.add_argument("--max-targets", type=positive_int, default=8, help="most target prompts per edit")
    p.add_argument("--max-steps", type=positive_int, default=100, help="most steps per inversion")
    p.add_argument("--disk-gb", type=float, default=2.0, help="size cap of the on-disk inversion cache")
    add_model_args(p, f"model preset, diffusers folder or hub id (default: {common.DEFAULT_MODEL})")
    p.set_defaults(func=cmd_serve)


def default_store_root() -> str:
    base = os.environ.get("PYINV_CACHE_DIR")
    if base:
        return os.path.join(os.path.expanduser(base), "inversions")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pyinv", "inversions")


def cmd_serve(args: argparse.Namespace) -> int:
    """``pyinv serve``: load the model, warm it, serve until SIGTERM / Ctrl-C (in-flight
    requests are finished first)."""
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.engine import Engine, Limits
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
    device, dtype = runtime(args)
    editor = common.load_editor(
        args.model or common.DEFAULT_MODEL, device, dtype, progress=False, backend=getattr(args, "backend", None)
    )
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_targets=args.max_targets,
        max_steps=args.max_steps,
        request_timeout_s=args.timeout,
        queue_size=args.queue_size,
    )
    store = InversionStore(args.cache_dir or default_store_root(), disk_bytes=int(args.disk_gb * (1 << 30)))
    app = create_app(Engine(editor, store, limits), api_key=api_key, cors_origins=args.cors_origin)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0
