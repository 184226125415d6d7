"""The HTTP API (FastAPI): inversions, edits, health, readiness and Prometheus metrics.

Routes (``/v1`` needs ``Authorization: Bearer <key>`` when the service has an API key):

- ``GET /``: the web page (``static/index.html``: invert an image, edit it, see the images
  side by side; no external resources, the API key typed into it is sent as the bearer
  token);
- ``POST /v1/inversions`` (multipart: ``image`` file, ``source_prompt``, ``method``,
  ``steps``, ``guidance``, ``seed``, ``options`` as JSON, ``psnr``) → id, PSNR, timings;
- ``POST /v1/edits`` (JSON :class:`EditRequest`) → one base64 PNG per target, timings;
- ``GET`` / ``DELETE /v1/inversions/{id}``; ``GET /v1/models``;
- ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is loaded and warmed),
  ``GET /metrics`` (Prometheus text).

Every client error is a JSON problem (``application/problem+json``: ``type``, ``title``,
``status``, ``detail``) with a clear message; an unexpected failure is a 500 problem with no
traceback (it is logged). Request bodies over the upload limit are refused from their
``Content-Length`` before they are read.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PyinvError
from .engine import Engine, NotFound, ServiceError, TooLarge
from .store import check_id

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"

#: the web page's policy: its own inline script and style, images from data: and blob: URLs,
#: requests to this service only; nothing from elsewhere, no framing
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_html() -> str:
    """The web page served at ``/`` (package data: ``pyinv/serve/static/index.html``)."""
    from importlib.resources import files

    return (files(__package__) / "static" / "index.html").read_text(encoding="utf-8")


def _problem(status: int, title: str, detail: str, headers=None):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=dict(headers or {}))


class EditRequest(BaseModel):
    inversion_id: str = Field(description="the id POST /v1/inversions returned")
    targets: list[str] = Field(min_length=1, description="target prompts: one edited image each")
    control: str | dict[str, Any] | None = Field(
        default=None, description='attention control: a name ("p2p", "masactrl", "pnp", "none") or '
        '{"kind": name, ...settings}; default: the method\'s own (prompt swap for most)',
    )  # fmt: skip
    guidance: float | None = Field(default=None, description="classifier-free guidance (default: the method's)")
    seed: int | None = Field(default=None, description="seed for methods that draw noise")
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific edit options")


def create_app(engine: Engine, api_key: str | None = None, cors_origins: list[str] | None = None, start: bool = True):
    """The ASGI app over ``engine`` (started, and warmed, when the app starts if ``start``)."""
    import contextlib

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    import pyinv

    registry = CollectorRegistry()
    latency = Histogram(
        "pyinv_request_seconds", "Request latency by route", ["route"], registry=registry,
        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    )  # fmt: skip
    depth = Gauge("pyinv_queue_depth", "Jobs waiting for the worker", registry=registry)
    batch = Histogram("pyinv_batch_size", "Target prompts per UNet batch", registry=registry, buckets=(1, 2, 4, 8, 16))
    forwards = Counter("pyinv_unet_image_forwards", "UNet image-forwards", registry=registry)
    cache = Counter("pyinv_inversion_cache", "Inversion cache lookups", ["result"], registry=registry)

    def observe(event: str, value: float) -> None:
        if event == "queue_depth":
            depth.set(value)
        elif event == "batch_size":
            batch.observe(value)
        elif event == "unet_image_forwards":
            forwards.inc(value)
        elif event in ("cache_hit", "cache_miss"):
            cache.labels(event.removeprefix("cache_")).inc(value)

    engine.observe = observe

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start:
            import anyio

            await anyio.to_thread.run_sync(engine.start)
        try:
            yield
        finally:
            import anyio

            await anyio.to_thread.run_sync(engine.stop)  # drains the queued jobs

    app = FastAPI(
        title="pyinv",
        version=pyinv.__version__,
        summary="Invert an image into a diffusion model once, then edit it with text.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def limits_and_timing(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > engine.limits.max_upload_bytes + (64 << 10):
            return _problem(413, "Request too large", f"the body is larger than {engine.limits.max_upload_bytes} bytes")
        start_t = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        latency.labels(getattr(route, "path", "unmatched")).observe(time.perf_counter() - start_t)
        return response

    @app.exception_handler(ServiceError)
    async def service_error(request, exc: ServiceError):
        return _problem(exc.status, exc.title, str(exc), exc.headers)

    @app.exception_handler(PyinvError)
    async def user_error(request, exc: PyinvError):
        return _problem(400, "Bad request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _problem(422, "Invalid request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return _problem(exc.status_code, exc.detail if isinstance(exc.detail, str) else "Error", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        return _problem(500, "Internal error", "the request failed inside the service; it has been logged")

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise Unauthorised("a valid bearer token is required (Authorization: Bearer <key>)")

    page = page_html()

    @app.get("/", summary="The web page", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/healthz", summary="The process answers")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed")
    def readyz():
        if not engine.ready:
            return _problem(503, "Not ready", "the model is loading or warming up", {"Retry-After": "5"})
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The model this service runs", dependencies=[Depends(authorised)])
    def models():
        model = engine.editor.model
        return {
            "models": [
                {
                    "name": model.name,
                    "device": str(model.device),
                    "dtype": str(model.dtype).removeprefix("torch."),
                    "backend": model.backend.name,
                    "image_size": model.image_size,
                }
            ]
        }

    @app.post("/v1/inversions", summary="Invert an image", dependencies=[Depends(authorised)])
    def create_inversion(
        image: Annotated[UploadFile, File(description="the image file (PNG, JPEG, WebP, …)")],
        source_prompt: Annotated[str, Form(description="what the image shows")] = "",
        method: Annotated[str, Form(description="inversion method (see pyinv methods)")] = "direct",
        steps: Annotated[int | None, Form(description="sampling steps (default: the method's)")] = None,
        guidance: Annotated[float | None, Form(description="guidance the inversion is made for")] = None,
        seed: Annotated[int | None, Form(description="seed for methods that draw noise")] = None,
        options: Annotated[str, Form(description="method options as a JSON object")] = "{}",
        psnr: Annotated[bool, Form(description="also report the reconstruction's PSNR (one more pass)")] = True,
    ):
        data = image.file.read(engine.limits.max_upload_bytes + 1)
        if len(data) > engine.limits.max_upload_bytes:
            raise TooLarge(f"the image is larger than {engine.limits.max_upload_bytes} bytes")
        try:
            parsed = json.loads(options or "{}")
        except ValueError as exc:
            raise ServiceError(f"options is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ServiceError("options must be a JSON object")
        return engine.invert(data, source_prompt, method, steps, guidance, seed, parsed, psnr)

    @app.get("/v1/inversions/{inversion_id}", summary="An inversion's record", dependencies=[Depends(authorised)])
    def get_inversion(inversion_id: str):
        check_id(inversion_id)
        inv = engine.store.get(inversion_id, fingerprint=engine.editor.model.fingerprint())
        if inv is None:
            raise NotFound(f"no inversion {inversion_id}")
        return {
            "id": inversion_id,
            "method": inv.method,
            "source_prompt": inv.source_prompt,
            "steps": inv.num_steps,
            "guidance": inv.guidance,
            "image_size": inv.image_size,
        }

    @app.delete("/v1/inversions/{inversion_id}", summary="Forget an inversion", dependencies=[Depends(authorised)])
    def delete_inversion(inversion_id: str):
        check_id(inversion_id)
        if not engine.store.delete(inversion_id):
            raise NotFound(f"no inversion {inversion_id}")
        return {"deleted": inversion_id}

    @app.post("/v1/edits", summary="Edit an inverted image", dependencies=[Depends(authorised)])
    def create_edit(request: EditRequest):
        return engine.edit(
            request.inversion_id, request.targets, request.control, request.guidance, request.seed, request.options
        )

    return app


class Unauthorised(ServiceError):
    status, title = 401, "Unauthorised"
    headers = {"WWW-Authenticate": "Bearer"}
