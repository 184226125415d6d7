"""The export cache: exported graphs and built engines on disk, never used stale or half-written.

Layout under the root (``$PYINV_CACHE_DIR/exports``, default ``~/.cache/pyinv/exports``)::

    <slot>/meta.json       the entry's key, what it is for, and the size and SHA-256 of each file
    <slot>/unet.onnx       the files the builder wrote (an ONNX graph and its weights, an engine)
    .partial-<slot>-…/     an entry being written (never read)

An entry's *slot* is a hash of what it is for (the model's fingerprint, the graph signature,
the dtype, the kind of file; the GPU for an engine); its *key* adds what it was made with
(opset, library versions, TensorRT version). A lookup uses an entry only when its key and
what it is for are the expected ones and every file has its recorded size and hash: a stale
entry (made with other versions) or a corrupt one (a file changed, truncated or missing,
unreadable meta) is rebuilt in its slot. Entries are written in a partial directory and
renamed into place, so an interrupted write leaves no entry, only a partial directory that
lookups ignore and :meth:`ExportCache.clean_partial` removes. When two writers (threads or
processes) build one slot at once, the first entry renamed into place is kept and the
other's files are dropped.
"""

from __future__ import annotations

import contextlib
import errno
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

    def validate(self, path: Path, key: Mapping[str, Any], what: Mapping[str, Any] | None = None) -> str | None:
        """Why the entry at ``path`` may not be used for ``key`` (``None``: it may); with
        ``what``, also when it was written for something else (an entry copied into another
        slot)."""
        try:
            meta = json.loads((path / _META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "it has no meta file"
        except NotADirectoryError:
            return "it is not a directory"
        except (OSError, ValueError) as exc:
            return f"its meta file is unreadable ({exc})"
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict) or not files or "key" not in meta:
            return "its meta file is malformed"
        if _canonical_json(meta["key"]) != _canonical_json({"format": FORMAT, **key}):
            return "it was made for another key (other versions or settings)"
        if what is not None and _canonical_json(meta.get("what")) != _canonical_json({"format": FORMAT, **what}):
            return "it was made for another graph or model than its slot is for"
        for name, want in files.items():
            if not _plain_name(name) or not isinstance(want, dict):
                return "its meta file is malformed"
            file = path / name
            if not file.is_file():
                return f"its file {name} is missing"
            try:
                size = file.stat().st_size
                digest = file_digest(file) if size == want.get("size") else None
            except OSError as exc:
                return f"its file {name} is unreadable ({exc})"
            if size != want.get("size") or digest != want.get("sha256"):
                return f"its file {name} does not match its recorded size and hash"
        return None

    def lookup(self, what: Mapping[str, Any], key: Mapping[str, Any]) -> Entry | None:
        """The valid entry for ``what`` under ``key``, or ``None`` (absent, stale or corrupt)."""
        path = self.root / self.slot_of(what)
        if not path.exists():
            return None
        problem = self.validate(path, key, what)
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
        try:
            partial.mkdir()
        except OSError as exc:
            raise PyinvError(f"cannot write to the export cache {self.root}: {exc}") from exc
        start = time.perf_counter()
        try:
            build(partial)
            files = {
                p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
                for p in sorted(partial.iterdir())
                if p.is_file() and p.name != _META
            }
            if not files:
                raise PyinvError("the export wrote no file")
            meta = {"key": {"format": FORMAT, **key}, "what": {"format": FORMAT, **what}, "files": files}
            (partial / _META).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
            seconds = time.perf_counter() - start
            installed = self._install(partial, self.root / slot, key, what)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return Entry(self.root / slot, built=installed, seconds=seconds)

    def _install(self, partial: Path, final: Path, key: Mapping[str, Any], what: Mapping[str, Any]) -> bool:
        """Rename ``partial`` to ``final``, replacing an invalid entry there; returns whether
        it did. A valid entry put there meanwhile (by another thread or process) is kept and
        ``partial`` dropped."""
        with _LOCK:
            for _ in range(5):
                if final.exists() or final.is_symlink():
                    if self.validate(final, key, what) is None:
                        shutil.rmtree(partial, ignore_errors=True)
                        return False
                    _discard(final)
                try:
                    os.replace(partial, final)
                    return True
                except OSError as exc:
                    # another process installed its entry between the check and the rename
                    # (a directory is not renamed onto a non-empty one): check that one
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        raise
            raise PyinvError(f"cannot install the export cache entry {final}: it keeps being replaced")

    def remove(self, entry: Entry) -> None:
        """Drop an entry (one found unusable after it was written)."""
        with _LOCK:
            _discard(entry.path)

    def entries(self) -> list[Path]:
        """The entry directories (complete or not valid; partial ones excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(_PARTIAL))

    def clean_partial(self, older_than_s: float = 3600.0) -> int:
        """Remove partial directories older than ``older_than_s`` (left by interrupted
        writes; a younger one may be a write in progress in another process); returns how many."""
        if not self.root.is_dir():
            return 0
        removed = 0
        now = time.time()
        for p in list(self.root.iterdir()):
            if not p.name.startswith(_PARTIAL):
                continue
            try:
                if now - p.lstat().st_mtime < older_than_s:
                    continue
            except FileNotFoundError:  # removed meanwhile (its write ended)
                continue
            _delete(p)
            if not (p.exists() or p.is_symlink()):
                removed += 1
        return removed


def _plain_name(name: Any) -> bool:
    """A file name in the entry's own directory (no path, not the meta file)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", _META)
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _delete(path: Path) -> None:
    """Remove a file or a directory tree, whatever is left of it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _discard(path: Path) -> None:
    """Take an entry out of its slot at once (renamed to a partial name, which lookups
    ignore), then delete it."""
    old = path.with_name(f"{_PARTIAL}old-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, old)
    except FileNotFoundError:  # already gone
        return
    _delete(old)
