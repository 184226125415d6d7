"""The export cache: exported graphs and built engines on disk, never used stale or half-written.

Layout under the root (``$PYINV_CACHE_DIR/exports``, default ``~/.cache/pyinv/exports``)::

    <slot>/meta.json       the entry's key and the size and SHA-256 of each of its files
    <slot>/unet.onnx       the files the builder wrote (an ONNX graph and its weights, an engine)
    .partial-<slot>-…/     an entry being written (never read)

An entry's *slot* is a hash of what it is for (the model's fingerprint, the graph signature,
the dtype, the kind of file; the GPU for an engine); its *key* adds what it was made with
(opset, library versions, TensorRT version). A lookup uses an entry only when its key is the
expected one and every file has its recorded size and hash: a stale entry (made with other
versions) or a corrupt one (a file changed, truncated or missing, unreadable meta) is rebuilt
in its slot. Entries are written in a partial directory and renamed into place, so an
interrupted write leaves no entry, only a partial directory that lookups ignore and
:meth:`ExportCache.clean_partial` removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PyinvError

log = logging.getLogger(__name__)

#: bumped when the entry layout changes (part of every key)
FORMAT = 1
_META = "meta.json"
_PARTIAL = ".partial-"
_LOCK = threading.Lock()


def default_root() -> Path:
    """``$PYINV_CACHE_DIR/exports``, else ``$XDG_CACHE_HOME/pyinv/exports``, else ``~/.cache/pyinv/exports``."""
    base = os.environ.get("PYINV_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "exports"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pyinv" / "exports"


def _canonical_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """A valid cache entry: its directory and whether this lookup built it."""

    path: Path
    built: bool
    seconds: float = 0.0

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file() and p.name != _META)


class ExportCache:
    """Entries on disk under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ExportCache({str(self.root)!r})"

    @staticmethod
    def slot_of(what: Mapping[str, Any]) -> str:
        """The slot name for ``what`` (plain JSON data)."""
        return hashlib.sha256(_canonical_json({"format": FORMAT, **what}).encode()).hexdigest()[:32]

    def validate(self, path: Path, key: Mapping[str, Any]) -> str | None:
        """Why the entry at ``path`` may not be used for ``key`` (``None``: it may)."""
        try:
            meta = json.loads((path / _META).read_text())
        except FileNotFoundError:
            return "it has no meta file"
        except (OSError, ValueError) as exc:
            return f"its meta file is unreadable ({exc})"
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "key" not in meta:
            return "its meta file is malformed"
        if _canonical_json(meta["key"]) != _canonical_json({"format": FORMAT, **key}):
            return "it was made for another key (other versions or settings)"
        for name, want in meta["files"].items():
            file = path / name
            try:
                size = file.stat().st_size
            except OSError:
                return f"its file {name} is missing"
            if size != want.get("size") or file_digest(file) != want.get("sha256"):
                return f"its file {name} does not match its recorded size and hash"
        return None

    def lookup(self, what: Mapping[str, Any], key: Mapping[str, Any]) -> Entry | None:
        """The valid entry for ``what`` under ``key``, or ``None`` (absent, stale or corrupt)."""
        path = self.root / self.slot_of(what)
        if not path.exists():
            return None
        problem = self.validate(path, key)
        if problem is not None:
            log.warning("export cache: not using %s: %s; it will be rebuilt", path, problem)
            return None
        return Entry(path, built=False)

    def get_or_build(self, what: Mapping[str, Any], key: Mapping[str, Any], build: Callable[[Path], None]) -> Entry:
        """The valid entry for ``what``, built by ``build(directory)`` (which writes the
        entry's files there) when there is none. The entry appears whole or not at all."""
        found = self.lookup(what, key)
        if found is not None:
            return found
        slot = self.slot_of(what)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PyinvError(f"cannot create the export cache {self.root}: {exc}") from exc
        partial = self.root / f"{_PARTIAL}{slot}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        start = time.perf_counter()
        try:
            build(partial)
            files = {
                p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
                for p in sorted(partial.iterdir())
                if p.is_file()
            }
            if not files:
                raise PyinvError("the export wrote no file")
            meta = {"key": {"format": FORMAT, **key}, "what": {"format": FORMAT, **what}, "files": files}
            (partial / _META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            seconds = time.perf_counter() - start
            self._install(partial, self.root / slot, key)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return Entry(self.root / slot, built=True, seconds=seconds)

    def _install(self, partial: Path, final: Path, key: Mapping[str, Any]) -> None:
        """Rename ``partial`` to ``final``, replacing an invalid entry there; a valid one put
        there meanwhile by another process is kept and ``partial`` dropped."""
        with _LOCK:
            if final.exists():
                if self.validate(final, key) is None:
                    shutil.rmtree(partial, ignore_errors=True)
                    return
                old = final.with_name(f"{_PARTIAL}old-{final.name}-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(partial, final)

    def remove(self, entry: Entry) -> None:
        """Drop an entry (one found unusable after it was written)."""
        with _LOCK:
            if entry.path.exists():
                old = entry.path.with_name(f"{_PARTIAL}old-{entry.path.name}-{uuid.uuid4().hex[:8]}")
                os.replace(entry.path, old)
                shutil.rmtree(old, ignore_errors=True)

    def entries(self) -> list[Path]:
        """The entry directories (complete or not valid; partial ones excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(_PARTIAL))

    def clean_partial(self, older_than_s: float = 3600.0) -> int:
        """Remove partial directories older than ``older_than_s`` (left by interrupted
        writes); returns how many."""
        if not self.root.is_dir():
            return 0
        removed = 0
        now = time.time()
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(_PARTIAL) and now - p.stat().st_mtime >= older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
        return removed
