"""The engine behind the service: one worker per model holding it hot, a bounded queue.

Requests become jobs on a bounded queue (:class:`Limits.queue_size`); one worker thread runs
them in order on the :class:`~pyinv.api.Editor`, so the model is used by one job at a time
and the UNet's memory stays that of one edit. A full queue refuses at once
(:class:`QueueFull`: the service answers 503 with ``Retry-After``) instead of letting a
request wait past its timeout; a request that waits longer than
:attr:`Limits.request_timeout_s` is answered 504 and its job, when it has not started, is
dropped. A job that fails fails its request only: the worker goes on. :meth:`Engine.stop`
finishes the jobs already queued (``drain``) before the worker ends.

Inversions are kept in an :class:`~pyinv.serve.store.InversionStore` under content-addressed
ids (the image's bytes, prompt, method, options and the model), so the same upload is
inverted once and edited any number of times.
"""

from __future__ import annotations

import base64
import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from ..errors import PyinvError
from ..imageio import load_image_bytes
from .store import check_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_upload_bytes: largest request body (an uploaded image and its fields).
        max_pixels: largest image, width × height, checked before decoding (bombs).
        max_prompt_chars: longest prompt in characters (the model's token limit applies too).
        max_targets: most target prompts per edit.
        max_steps: most sampling steps per inversion.
        request_timeout_s: longest a request waits for its job (queue + run).
        queue_size: most jobs waiting; more are refused with 503.
    """

    max_upload_bytes: int = 20 << 20
    max_pixels: int = 16_000_000
    max_prompt_chars: int = 1000
    max_targets: int = 8
    max_steps: int = 100
    request_timeout_s: float = 300.0
    queue_size: int = 16


class ServiceError(PyinvError):
    """A request the service refuses: HTTP ``status``, a short ``title`` and the message."""

    status = 400
    title = "Bad request"
    headers: Mapping[str, str] = {}


class NotFound(ServiceError):
    status, title = 404, "Not found"


class TooLarge(ServiceError):
    status, title = 413, "Request too large"


class QueueFull(ServiceError):
    status, title = 503, "Busy"
    headers = {"Retry-After": "2"}


class TimedOut(ServiceError):
    status, title = 504, "Timed out"


class Stopping(ServiceError):
    status, title = 503, "Shutting down"
    headers = {"Retry-After": "5"}


def png_base64(image) -> str:
    """A PIL image as base64 PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Engine:
    """The worker, its queue, the editor and the inversion store (see the module docstring).

    ``observe(event, value)`` is told what the metrics count: ``"queue_depth"``,
    ``"batch_size"``, ``"unet_image_forwards"``, ``"cache_hit"``, ``"cache_miss"``.
    """

    def __init__(self, editor, store, limits: Limits = Limits(), observe: Callable[[str, float], None] | None = None):
        self.editor = editor
        self.store = store
        self.limits = limits
        self.observe = observe or (lambda event, value: None)
        self._queue: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self.ready = False

    # ------------------------------------------------------------------ life cycle
    def start(self, warm: bool = True) -> None:
        """Start the worker; ``warm`` first runs a tiny inversion and edit, so the first
        request does not pay for lazy initialisation (compilation, export, allocation)."""
        if self._worker is not None:
            return
        self._worker = threading.Thread(target=self._work, name="pyinv-engine", daemon=True)
        self._worker.start()
        if warm:
            self._submit(self._warm_up).result()
        self.ready = True

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs; finish the queued ones (``drain``) or fail them, then end the worker."""
        self.ready = False
        self._stopping.set()
        if not drain:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                job[1].set_exception(Stopping("the service is shutting down"))
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout)
            self._worker = None

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, future = job
            self.observe("queue_depth", self._queue.qsize())
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - the job's failure is its request's, not the worker's
                future.set_exception(exc)

    def _submit(self, fn: Callable[[], Any]) -> Future:
        if self._stopping.is_set():
            raise Stopping("the service is shutting down")
        future: Future = Future()
        try:
            self._queue.put_nowait((fn, future))
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.limits.queue_size} jobs waiting); retry shortly") from None
        self.observe("queue_depth", self._queue.qsize())
        return future

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker and wait for it (at most the request timeout)."""
        future = self._submit(fn)
        try:
            return future.result(timeout=self.limits.request_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise TimedOut(f"the request took longer than {self.limits.request_timeout_s:g} s") from None

    def _warm_up(self) -> None:
        from PIL import Image

        side = self.editor.model.image_size
        image = Image.new("RGB", (side, side), (128, 96, 64))
        inv = self.editor.invert(image, "a photo", method="direct", steps=2)
        self.editor.edit(inv, "a painting")

    # ------------------------------------------------------------------ checks
    def check_prompt(self, prompt: Any, what: str) -> str:
        if not isinstance(prompt, str):
            raise ServiceError(f"{what} must be a string")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ServiceError(f"{what} is longer than {self.limits.max_prompt_chars} characters")
        return prompt

    # ------------------------------------------------------------------ requests
    def invert(
        self,
        image_bytes: bytes,
        source_prompt: str,
        method: str = "direct",
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
        psnr: bool = True,
    ) -> dict[str, Any]:
        """Invert an uploaded image (or find it inverted already): its id, the
        reconstruction's PSNR against the input (when ``psnr``), timings."""
        from ..inversion import get_method
        from .store import inversion_id

        if len(image_bytes) > self.limits.max_upload_bytes:
            raise TooLarge(f"the image is larger than {self.limits.max_upload_bytes} bytes")
        self.check_prompt(source_prompt, "source_prompt")
        if steps is not None and not 1 <= int(steps) <= self.limits.max_steps:
            raise ServiceError(f"steps must be between 1 and {self.limits.max_steps}")
        image = load_image_bytes(image_bytes, "the uploaded image", self.limits.max_pixels)
        name = get_method(method).name
        settings = {"steps": steps, "guidance": guidance, "seed": seed, **dict(options or {})}
        key = inversion_id(image_bytes, source_prompt, name, settings, self.editor.model.fingerprint())

        def job() -> dict[str, Any]:
            start = time.perf_counter()
            inv = self.store.get(key)
            cached = inv is not None
            self.observe("cache_hit" if cached else "cache_miss", 1)
            if inv is None:
                before = self.editor.model.unet_image_forwards
                inv = self.editor.invert(
                    image, source_prompt, method=name, steps=steps, guidance=guidance, seed=seed, **dict(options or {})
                )
                self.observe("unet_image_forwards", self.editor.model.unet_image_forwards - before)
                self.store.put(key, inv)
            inverted = time.perf_counter()
            out = {"id": key, "method": inv.method, "steps": inv.num_steps, "cached": cached}
            if psnr:
                out["psnr_db"] = self._psnr(inv, image)
            out["timings"] = {"invert_s": inverted - start, "total_s": time.perf_counter() - start}
            return out

        return self.run(job)

    def _psnr(self, inv, image) -> float | None:
        from ..bench.metrics import masked_psnr, to_unit_tensor
        from ..imageio import center_crop_resize

        rec = self.editor.reconstruct(inv).source_image
        if rec is None:
            return None
        target = center_crop_resize(image, rec.size[0])
        value = float(masked_psnr(to_unit_tensor(rec), to_unit_tensor(target))[0])
        return value if value != float("inf") else None

    def edit(
        self,
        inversion_id: str,
        targets: Sequence[str],
        control: Any = None,
        guidance: float | None = None,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Edit a stored inversion towards each target: one PNG (base64) per target, timings."""
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise ServiceError("give at least one target prompt")
        if len(targets) > self.limits.max_targets:
            raise ServiceError(f"at most {self.limits.max_targets} target prompts per edit")
        targets = [self.check_prompt(t, "each target prompt") for t in targets]
        controller = self.controller(control)
        check_id(inversion_id)

        def job() -> dict[str, Any]:
            start = time.perf_counter()
            inv = self.store.get(inversion_id, fingerprint=self.editor.model.fingerprint())
            if inv is None:
                raise NotFound(f"no inversion {inversion_id} (unknown, deleted or evicted)")
            result = self.editor.edit(
                inv, list(targets), guidance=guidance, control=controller, seed=seed, **dict(options or {})
            )
            self.observe("batch_size", len(targets))
            self.observe("unet_image_forwards", result.unet_image_forwards)
            pairs = zip(targets, result.images, strict=True)
            images = [{"prompt": p, "png_base64": png_base64(img)} for p, img in pairs]
            total = time.perf_counter() - start
            return {
                "inversion_id": inversion_id,
                "images": images,
                "unet_image_forwards": result.unet_image_forwards,
                "timings": {"edit_s": result.seconds, "total_s": total},
            }

        return self.run(job)

    @staticmethod
    def controller(control: Any):
        """A controller from a request's ``control``: ``None``, a name (``"p2p"``), or
        ``{"kind": name, **settings}``."""
        from ..control.registry import build_controller

        if control is None:
            return None
        if isinstance(control, str):
            return build_controller(control)
        if isinstance(control, Mapping):
            settings = dict(control)
            kind = settings.pop("kind", None)
            if not isinstance(kind, str):
                raise ServiceError('control must be a name or an object with a "kind" (p2p, masactrl, pnp, none)')
            try:
                return build_controller(kind, **settings)
            except TypeError as exc:
                raise ServiceError(f"bad control settings for {kind}: {exc}") from None
        raise ServiceError("control must be a name or an object")
