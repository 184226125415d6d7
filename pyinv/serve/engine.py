"""The engine behind the service: one worker per model holding it hot, a bounded queue.

Requests become jobs on a bounded queue (:class:`Limits.queue_size`); one worker thread runs
them in order on the :class:`~pyinv.api.Editor`, so the model is used by one job at a time.
Edits waiting in the queue with the same control, guidance and options are run together
(:attr:`Limits.max_batch_targets` targets at most): those of one inversion as one edit of
all their targets, and the edits of different inversions sharing each step's UNet call
(:meth:`pyinv.api.Editor.edit_many`) — one UNet batch per step for all of them, each
request answered with its own images. A full queue refuses at once
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
import collections
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
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
        max_batch_targets: most target prompts one batched edit may gather from concurrent
            requests (1: no batching).
    """

    max_upload_bytes: int = 20 << 20
    max_pixels: int = 16_000_000
    max_prompt_chars: int = 1000
    max_targets: int = 8
    max_steps: int = 100
    request_timeout_s: float = 300.0
    queue_size: int = 16
    max_batch_targets: int = 8


@dataclass(frozen=True)
class EditCall:
    """What an edit request asks for, besides its targets (the request's own controller)."""

    inversion_id: str
    controller: Any
    guidance: float | None
    seed: int | None
    options: Mapping[str, Any]


@dataclass(frozen=True)
class InvertCall:
    """What an inversion request asks for: its content-addressed ``key``, the decoded image,
    the prompt, the method and its settings, and whether to measure the PSNR."""

    key: str
    image: Any
    source_prompt: str
    method: str
    steps: int | None
    guidance: float | None
    seed: int | None
    options: Mapping[str, Any]
    psnr: bool


@dataclass(eq=False)
class Job:
    """A queued unit of work: ``run()``'s result goes to ``future``.

    Edit jobs also carry the ``edit`` they ask for, their ``targets``, a ``share_key`` (equal
    for edits whose UNet calls may be shared: the same control, guidance and options, any
    inversion) and a ``batch_key`` (equal for edits that differ only in their targets: the
    same inversion and seed too, so they are one edit of all their targets)."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    batch_key: str | None = None
    share_key: str | None = None
    targets: tuple[str, ...] = ()
    edit: EditCall | None = None
    invert: InvertCall | None = None


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
        # an Editor, or a function loading one on the worker thread (see start)
        self._load = editor if callable(editor) else None
        self.editor = None if self._load is not None else editor
        self.store = store
        self.limits = limits
        self.observe = observe or (lambda event, value: None)
        self._jobs: collections.deque[Job | None] = collections.deque()
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self.ready = False

    # ------------------------------------------------------------------ life cycle
    def start(self, warm: bool = True) -> None:
        """Start the worker; ``warm`` first runs a tiny inversion and edit, so the first
        request does not pay for lazy initialisation (compilation, export, allocation).

        An engine made with a function instead of an editor loads the editor here, on the
        worker thread (its errors are raised here): the model then runs on the thread that
        loaded it. On the CPU that matters: torch's thread pool serves the thread that first
        used it best — the demo model's 10-step P2P edit took 0.5 s there and 0.9 s from any
        other thread on this 2-core machine."""
        if self._worker is not None:
            return
        self._worker = threading.Thread(target=self._work, name="pyinv-engine", daemon=True)
        self._worker.start()
        if self.editor is None:
            self._submit(Job(self._load_editor)).future.result()
        if warm:
            self._submit(Job(self._warm_up)).future.result()
        self.ready = True

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs; finish the queued ones (``drain``) or fail them, then end the worker."""
        self.ready = False
        self._stopping.set()
        if not drain:
            with self._wake:
                dropped = [job for job in self._jobs if job is not None]
                self._jobs.clear()
            for job in dropped:
                job.future.set_exception(Stopping("the service is shutting down"))
        if self._worker is not None:
            with self._wake:
                self._jobs.append(None)
                self._wake.notify()
            self._worker.join(timeout)
            self._worker = None

    @property
    def worker_alive(self) -> bool:
        """Whether the worker thread runs (``False`` before :meth:`start`, after :meth:`stop`,
        and if it ever died)."""
        worker = self._worker
        return worker is not None and worker.is_alive()

    @property
    def queue_depth(self) -> int:
        return sum(job is not None for job in self._jobs)

    def _next(self) -> list[Job] | None:
        """The next job, with the queued edits that may share its UNet calls (``None``: stop)."""
        with self._wake:
            while not self._jobs:
                self._wake.wait()
            job = self._jobs.popleft()
            if job is None:
                return None
            batch = [job]
            if job.share_key is not None:
                room = self.limits.max_batch_targets - len(job.targets)
                for other in list(self._jobs):
                    if other is not None and other.share_key == job.share_key and len(other.targets) <= room:
                        self._jobs.remove(other)
                        batch.append(other)
                        room -= len(other.targets)
            self.observe("queue_depth", self.queue_depth)
            return batch

    def _work(self) -> None:
        while (batch := self._next()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if len(batch) == 1:
                self._finish(batch[0], batch[0].run)
            elif batch:
                self._run_batch(batch)

    @staticmethod
    def _finish(job: Job, fn: Callable[[], Any]) -> None:
        try:
            job.future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - the job's failure is its request's, not the worker's
            job.future.set_exception(exc)

    def _run_batch(self, batch: list[Job]) -> None:
        """Concurrent edits as one :meth:`~pyinv.api.Editor.edit_many`: those of one inversion
        (one ``batch_key``) as one edit of all their targets, the edits of different
        inversions sharing each step's UNet call; each request is given its own images. If the
        shared run fails, each edit runs alone (one bad request does not fail the others)."""
        if batch[0].invert is not None:
            self._run_inversions(batch)
            return
        groups: dict[str, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.batch_key or str(id(job)), []).append(job)
        try:
            out = self._edit_groups(list(groups.values()))
        except BaseException:  # noqa: BLE001 - retried one by one below
            for job in batch:
                self._finish(job, job.run)
            return
        for members, result in zip(groups.values(), out, strict=True):
            start = 0
            for job in members:
                part = dict(result)
                part["images"] = result["images"][start : start + len(job.targets)]
                start += len(job.targets)
                job.future.set_result(part)

    def _run_inversions(self, batch: list[Job]) -> None:
        """Concurrent inversions with one method and settings, inverted together; if that
        fails, each runs alone."""
        try:
            out = self._invert_group([job.invert for job in batch])
        except BaseException:  # noqa: BLE001 - retried one by one below
            for job in batch:
                self._finish(job, job.run)
            return
        for job, result in zip(batch, out, strict=True):
            job.future.set_result(result)

    def _edit_groups(self, groups: list[list[Job]]) -> list[dict[str, Any]]:
        """Run the edit groups together (see :meth:`_run_batch`): one response per group."""
        from ..api import EditSpec

        start = time.perf_counter()
        specs = []
        for members in groups:
            call = members[0].edit
            specs.append(
                EditSpec(
                    self._stored(call.inversion_id),
                    [t for job in members for t in job.targets],
                    guidance=call.guidance,
                    control=call.controller,
                    seed=call.seed,
                    options=dict(call.options),
                )
            )
        results = self.editor.edit_many(specs)
        total = sum(len(spec.target) for spec in specs)
        self.observe("batch_size", total)
        responses = []
        for members, spec, result in zip(groups, specs, results, strict=True):
            self.observe("unet_image_forwards", result.unet_image_forwards)
            responses.append(
                self._response(members[0].edit.inversion_id, spec.target, result, start, total, len(specs))
            )
        return responses

    def _stored(self, inversion_id: str):
        inv = self.store.get(inversion_id, fingerprint=self.editor.model.fingerprint())
        if inv is None:
            raise NotFound(f"no inversion {inversion_id} (unknown, deleted or evicted)")
        return inv

    @staticmethod
    def _response(inversion_id, names, result, start: float, targets: int, edits: int) -> dict[str, Any]:
        pairs = zip(names, result.images, strict=True)
        return {
            "inversion_id": inversion_id,
            "images": [{"prompt": p, "png_base64": png_base64(img)} for p, img in pairs],
            "batch_targets": targets,
            "batch_edits": edits,
            "unet_image_forwards": result.unet_image_forwards,
            "timings": {"edit_s": result.seconds, "total_s": time.perf_counter() - start},
        }

    def _submit(self, job: Job) -> Job:
        if self._stopping.is_set():
            raise Stopping("the service is shutting down")
        with self._wake:
            if self.queue_depth >= self.limits.queue_size:
                raise QueueFull(f"the queue is full ({self.limits.queue_size} jobs waiting); retry shortly")
            self._jobs.append(job)
            self._wake.notify()
            self.observe("queue_depth", self.queue_depth)
        return job

    def run(self, fn: Callable[[], Any] | Job) -> Any:
        """Run ``fn`` (or a :class:`Job`) on the worker and wait for it (at most the request timeout)."""
        job = self._submit(fn if isinstance(fn, Job) else Job(fn))
        try:
            return job.future.result(timeout=self.limits.request_timeout_s)
        except FutureTimeout:
            job.future.cancel()
            raise TimedOut(f"the request took longer than {self.limits.request_timeout_s:g} s") from None

    def _load_editor(self) -> None:
        self.editor = self._load()

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
        call = InvertCall(key, image, source_prompt, name, steps, guidance, seed, dict(options or {}), psnr)

        def invert_alone() -> dict[str, Any]:
            return self._invert_group([call])[0]

        # concurrent inversions with these settings may share their UNet calls (Engine._next)
        share = None
        if self.limits.max_batch_targets > 1:
            share = "invert:" + json.dumps({"method": name, **settings}, sort_keys=True, default=repr)
        return self.run(Job(invert_alone, share_key=share, targets=(source_prompt,), invert=call))

    def _invert_group(self, calls: list[InvertCall]) -> list[dict[str, Any]]:
        """Inversions with one method and settings: those found in the store are answered from
        it, the others inverted together (:meth:`~pyinv.api.Editor.invert_many`: one UNet call
        per step for the pivot methods) and stored; one response per call."""
        start = time.perf_counter()
        found = {c.key: self.store.get(c.key) for c in calls}
        for c in calls:
            self.observe("cache_hit" if found[c.key] is not None else "cache_miss", 1)
        todo = list({c.key: c for c in calls if found[c.key] is None}.values())  # one per distinct upload
        if todo:
            first = todo[0]
            before = self.editor.model.unet_image_forwards
            made = self.editor.invert_many(
                [c.image for c in todo],
                [c.source_prompt for c in todo],
                method=first.method,
                steps=first.steps,
                guidance=first.guidance,
                seed=first.seed,
                **first.options,
            )
            self.observe("unet_image_forwards", self.editor.model.unet_image_forwards - before)
            for c, inv in zip(todo, made, strict=True):
                self.store.put(c.key, inv)
        inverted = time.perf_counter()
        made_now = {c.key for c in todo}
        responses = []
        for c in calls:
            inv = found[c.key] or self.store.get(c.key)
            out = {"id": c.key, "method": inv.method, "steps": inv.num_steps, "cached": c.key not in made_now}
            out["batch_inversions"] = len(todo)
            if c.psnr:
                out["psnr_db"] = self._psnr(inv, c.image)
            out["timings"] = {"invert_s": inverted - start, "total_s": time.perf_counter() - start}
            responses.append(out)
        return responses

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

        call = EditCall(inversion_id, controller, guidance, seed, dict(options or {}))
        names = list(targets)

        def edit_alone() -> dict[str, Any]:
            start = time.perf_counter()
            inv = self._stored(inversion_id)
            result = self.editor.edit(inv, names, guidance=guidance, control=controller, seed=seed, **call.options)
            self.observe("batch_size", len(names))
            self.observe("unet_image_forwards", result.unet_image_forwards)
            return self._response(inversion_id, names, result, start, len(names), 1)

        # concurrent edits with these settings may share UNet calls (see Engine._next)
        batching = self.limits.max_batch_targets > 1
        settings = {"control": control, "guidance": guidance, "options": options}
        share = json.dumps(settings, sort_keys=True, default=repr) if batching else None
        same = json.dumps({**settings, "id": inversion_id, "seed": seed}, sort_keys=True, default=repr)
        job = Job(edit_alone, batch_key=same if batching else None, share_key=share, targets=tuple(names), edit=call)
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
