"""Scale-out with Ray Serve: the service's FastAPI app (:func:`~pyinv.serve.app.create_app`)
on several replicas, each a process holding its own model.

Each replica (:class:`PyinvReplica`, one Ray actor) builds an :class:`~pyinv.api.Editor`
from :class:`ReplicaSettings` (model, device, dtype, backend), an
:class:`~pyinv.serve.store.InversionStore` and an :class:`~pyinv.serve.engine.Engine`, and
serves ``create_app(engine, ...)``: the same routes, limits, problems and metrics as
``pyinv serve`` without Ray. Ray's HTTP proxy spreads the requests over the replicas; every
response says which replica answered in an ``X-Pyinv-Replica`` header.

**How a per-replica app is served.** Ray Serve's FastAPI integration, ``@serve.ingress(app)``,
takes the ASGI app when the deployment class is defined, in the process that defines it;
ours can only be built inside the replica, around the model that replica loaded. So the
class is wrapped with a small ASGI app, :class:`ReplicaASGI`, that forwards every call
(HTTP and lifespan) to the app the replica's constructor built (a replica is one process,
so the constructor leaves it where the forwarder finds it: in this module). The forwarder
needs only ``serve.ingress`` of a plain ASGI app and its lifespan, which Ray has long had;
recent releases can also build an app per replica from a builder function, which a class
whose constructor must hold the engine (for :meth:`PyinvReplica.check_health`) does not fit
as well. The declared lower bound, Ray 2.10, is set by the option names used here
(``max_ongoing_requests``, ``target_ongoing_requests``); it was tested with 2.60. Ray runs the
app's lifespan before the replica takes requests: that is where the engine starts and
warms the model (a tiny inversion and edit), so ``/readyz`` is true by the time Ray routes
to a replica, and where it drains its queue when the replica stops.

**Resources.** On CUDA each replica asks Ray for one GPU (``ray_actor_options={"num_gpus":
1}``; Ray makes it the only one the replica sees, ``cuda``), so N replicas need N GPUs; on
the CPU each asks for ``num_cpus`` (default 1; a fraction packs several onto a core).
``num_replicas`` is fixed, or :class:`Autoscaling` lets Ray vary it between
``min_replicas`` and ``max_replicas``, aiming at ``target_ongoing_requests`` per replica.
A replica accepts up to the engine's queue size + 1 requests at once
(``max_ongoing_requests``): one running and the rest queued, where same-inversion edits
may share a UNet batch; Ray holds the rest and sends them to the replica least loaded.

**Health.** :meth:`PyinvReplica.check_health`, which Ray calls every few seconds, fails when
the engine's worker thread is not running; Ray then replaces the replica.

**The inversion cache.** Each replica keeps its own in-memory LRU; the on-disk folder is
shared by every replica on a machine (``InversionStore(root, shared=True)``): an inversion
made on one replica is found on disk by the others, so an edit may land on any replica.
Sharing the folder is safe because the store's files are content-addressed and appear
only whole (written under a unique partial name, flushed, renamed into place); see
:mod:`pyinv.serve.store` for what the shared mode adds. Replicas on different machines share
it only if the folder is on a file system they all mount; otherwise an edit routed to a
machine that has not seen the inversion answers 404.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from .app import create_app
from .engine import Engine, Limits
from .store import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_ITEMS, InversionStore

#: the response header that names the replica which answered
REPLICA_HEADER = "X-Pyinv-Replica"
#: the Ray Serve application's name
APP_NAME = "pyinv"


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica builds: the model (``device`` ``"cpu"`` or ``"cuda"``: the GPU Ray
    gave the replica), its inversion store and the app's options.

    Attributes:
        model: model preset, diffusers folder or hub id (each replica loads it).
        device: ``"cpu"`` or ``"cuda"``; ``None``: CUDA when the replica has a GPU.
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (``None``: fp32).
        backend: the UNet's backend (``None``: eager).
        vae: a VAE folder or hub id in place of the model's own (``None``: its own).
        store_root: the inversion folder the replicas share (``None``: memory only).
        disk_bytes: the cap on the folder's size.
        memory_items: inversions each replica keeps in memory.
        limits: what one request may ask for.
        api_key: the bearer token ``/v1`` requires (``None``: none).
        cors_origins: origins allowed to call from a browser.
        threads: torch threads per replica (``None``: torch's default).
    """

    model: str
    device: str | None = None
    dtype: str | None = None
    backend: str | None = None
    vae: str | None = None
    store_root: str | None = None
    disk_bytes: int = DEFAULT_DISK_BYTES
    memory_items: int = DEFAULT_MEMORY_ITEMS
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    threads: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device.startswith("cuda")


@dataclass(frozen=True)
class Autoscaling:
    """Ray Serve autoscaling: between ``min_replicas`` and ``max_replicas`` replicas, scaled
    so that each has about ``target_ongoing_requests`` requests in flight (running or queued
    in its engine). The names are Ray's ``autoscaling_config`` keys."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0

    def config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


# ---------------------------------------------------------------------- inside a replica
_app: Any = None  # the app this process's replica built (one replica per process)


def _build(settings: ReplicaSettings) -> Engine:
    """Build one replica's Editor, store, engine and app (which :class:`ReplicaASGI` then
    serves); returns the engine."""
    import torch

    from ..api import Editor
    from ..models import parse_device, parse_dtype

    def load():  # on the engine's worker thread, which then runs the model (Engine.start)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        return Editor.from_pretrained(
            settings.model,
            device=parse_device(settings.device),
            dtype=parse_dtype(settings.dtype),
            progress=False,
            backend=settings.backend,
            vae=settings.vae,
        )

    store = InversionStore(
        settings.store_root, memory_items=settings.memory_items, disk_bytes=settings.disk_bytes, shared=True
    )
    engine = Engine(load, store, settings.limits)
    global _app
    _app = create_app(engine, api_key=settings.api_key, cors_origins=list(settings.cors_origins) or None)
    return engine


def replica_name() -> str:
    """This replica's id in Ray Serve (its process id outside a replica)."""
    try:
        tag = serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica, or a Ray without the field
        tag = None
    return str(tag or f"pid-{os.getpid()}")


class ReplicaASGI:
    """The ASGI app handed to ``serve.ingress``: forwards each call to the app this
    process's replica built, adding the ``X-Pyinv-Replica`` header to HTTP responses."""

    def __init__(self):
        self._header: bytes | None = None

    async def __call__(self, scope, receive, send):
        app = _app
        if app is None:  # the constructor has not run: Ray routes nothing here before it has
            raise RuntimeError("this replica has not built its app")
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if self._header is None:
            self._header = replica_name().encode("latin-1", "replace")
        header = (REPLICA_HEADER.lower().encode(), self._header)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await app(scope, receive, send_named)

    def add_exception_handler(self, exc_class, handler) -> None:
        """Ray registers its own errors' handlers (back-pressure: 503) on a FastAPI ingress:
        pass them to the app."""
        if _app is not None:
            _app.add_exception_handler(exc_class, handler)


@serve.deployment(name="pyinv")
@serve.ingress(ReplicaASGI())
class PyinvReplica:
    """One replica: loads the model and builds the app in its constructor; Ray then runs the
    app's lifespan (the engine starts and warms) before it routes requests here."""

    def __init__(self, settings: ReplicaSettings):
        # Ray ships this class to the replica by value: the module's functions do the work,
        # so that what they set is the module's own state (where ReplicaASGI looks)
        self.engine = _build(settings)

    async def check_health(self) -> None:
        """Ray's health check: fails when the engine's worker is not running."""
        check_engine(self.engine)


def check_engine(engine: Engine) -> None:
    """Raise when ``engine``'s worker is not running (a replica without one answers nothing)."""
    if not engine.worker_alive:
        raise RuntimeError("the engine's worker thread is not running")


# ---------------------------------------------------------------------- the driver
def deployment_options(
    settings: ReplicaSettings,
    replicas: int = 1,
    num_cpus: float | None = None,
    autoscaling: Autoscaling | None = None,
) -> dict[str, Any]:
    """The ``Deployment.options`` of the replicas: one GPU each on CUDA, ``num_cpus`` each
    (default 1); ``replicas`` of them, or ``autoscaling``."""
    actor: dict[str, Any] = {"num_cpus": 1.0 if num_cpus is None else float(num_cpus)}
    if settings.on_gpu:
        actor["num_gpus"] = 1
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.limits.queue_size + 1,
        # the longest a request may wait for its job: a stopping replica finishes what it holds
        "graceful_shutdown_timeout_s": settings.limits.request_timeout_s,
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling.config()
    else:
        options["num_replicas"] = int(replicas)
    return options


def application(
    settings: ReplicaSettings,
    replicas: int = 1,
    num_cpus: float | None = None,
    autoscaling: Autoscaling | None = None,
):
    """The Ray Serve application: :class:`PyinvReplica` with :func:`deployment_options`,
    bound to ``settings`` (pass it to :func:`deploy` or ``serve.run``)."""
    return PyinvReplica.options(**deployment_options(settings, replicas, num_cpus, autoscaling)).bind(settings)


def deploy(app, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> None:
    """Start Ray Serve's HTTP proxy on ``host:port`` (on the Ray instance ``ray.init``
    connected to) and run ``app`` at ``/``; returns once every replica is up and warmed."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/")


def failure_reason(name: str = APP_NAME) -> str | None:
    """Why the application's replicas failed to start, in one line: the last line of the
    error Ray Serve recorded for its deployment (a replica's constructor's exception, without
    its class name), or ``None`` when Serve tells nothing."""
    import re

    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - Serve itself is gone: nothing to tell
        return None
    if app is None:
        return None
    for deployment in app.deployments.values():
        lines = [line.strip() for line in str(deployment.message or "").splitlines() if line.strip()]
        if lines:
            match = re.fullmatch(r"[\w.]+(?:Error|Exception): (.+)", lines[-1])
            return match.group(1) if match else lines[-1]
    return str(app.message or "").strip() or None
