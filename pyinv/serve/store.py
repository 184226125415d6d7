"""The inversion cache of the service: inversions by content-addressed id, in memory and on disk.

An id (:func:`inversion_id`) is the SHA-256 of everything that decides an inversion: the
image file's bytes, the source prompt, the method, its options and the model's fingerprint.
Inverting the same image the same way with the same model gives the same id, so a second
request finds the first one's work.

:class:`InversionStore` keeps the most recently used inversions in memory (an LRU of
``memory_items``) over a folder that holds every inversion it was given, up to
``disk_bytes``::

    <root>/<id>.safetensors     one inversion (Inversion's file format, plus a checksum)
    <root>/.partial-….tmp       a file being written (never read; removed when a store starts)

Files are written to a partial file in the root, flushed to disk (fsync) and renamed into
place (Inversion's own ``save`` renames but does not flush), so a killed writer leaves no
entry, only a partial file. A file is read back with :meth:`Inversion.load` (which refuses
damaged or inconsistent records) and its checksum is checked: a SHA-256 over the JSON
description and every tensor's bytes, kept in the file's header, so a flipped bit in a
tensor is caught too. A file that fails either is deleted and treated as absent (the
inversion is made again). The checksum guards against damage, not against someone who can
write to the root: the root must be private to the service.

When the files' total passes ``disk_bytes``, the least recently used ones are deleted (a
``get`` or ``put`` sets a file's modification time, so the order survives a restart). By
default one store owns its root: it indexes the folder once, when it starts, and removes
every partial file it finds then; a second process on the same root would delete the first
one's partial files when it starts and would not see its later writes.

A store made with ``shared=True`` shares its root with other processes (the replicas of a
scaled-out service): the files are the source of truth and each process's memory LRU only a
read cache of them. Sharing is safe because an entry only ever appears whole (written to a
partial file of a unique name, flushed, renamed into place: a reader sees the old file or
the new one, never half of one), its name is its content's address (two processes writing
one id write inversions of the same inputs; the last rename wins, whole), and a reader
that finds a file damaged deletes it only if it is still the file it read. The shared mode
adds: a ``get`` that misses the index looks for the file on disk (another process's write);
a memory hit whose indexed file is gone (deleted or evicted by another process) is dropped;
``delete`` removes the file even when this process never indexed it; a store starting
removes only partial files older than :data:`SHARED_PARTIAL_AGE_S` (a younger one may be
another process's write in progress); and after each write the folder is indexed again, so
the cap and the least-recently-used order cover every process's files.

Ids are checked before any path is made from them (64 lowercase hexadecimal characters):
a store never reads or writes outside its root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import PyinvError
from ..fingerprint import fingerprints_match
from ..inversion import Inversion

log = logging.getLogger(__name__)

#: the default cap on the files' total size
DEFAULT_DISK_BYTES = 2 * 1024**3
#: the default number of inversions kept in memory
DEFAULT_MEMORY_ITEMS = 64
#: the header key of a file's checksum
CHECKSUM_KEY = "pyinv.store.sha256"
#: names the store writes while a file is not complete (its own and :func:`pyinv.imageio.atomic_path`'s)
PARTIAL_PREFIXES = (".partial-", ".pyinv-")
#: a shared store starting removes only the partial files older than this (seconds)
SHARED_PARTIAL_AGE_S = 3600.0
_SUFFIX = ".safetensors"
_ID = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"([0-9a-f]{64})\.safetensors")
_ID_DOMAIN = b"pyinv.inversion-id\x00v1"


class InvalidId(PyinvError):
    """An inversion id that is not 64 lowercase hexadecimal characters."""


class ModelMismatch(PyinvError):
    """A stored inversion made with another model than the one asked for."""


# ---------------------------------------------------------------------- ids
def _field(tag: bytes, data: bytes) -> bytes:
    """One field of an id's encoding: its tag, its length (8 bytes, big-endian) and its bytes."""
    return tag + len(data).to_bytes(8, "big") + data


def _canonical(value: Mapping[str, Any], what: str) -> bytes:
    """``value`` as sorted-key compact JSON (UTF-8); a value JSON cannot hold is a PyinvError."""
    if not isinstance(value, Mapping):
        raise PyinvError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PyinvError(f"{what} cannot be encoded as JSON: {exc}") from None
    return text.encode("utf-8")


def _text(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise PyinvError(f"{what} must be a string, got {type(value).__name__}")
    return value.encode("utf-8", "surrogatepass")


def inversion_id(
    image_bytes: bytes,
    source_prompt: str,
    method: str,
    options: Mapping[str, Any],
    model_fingerprint: Mapping[str, Any],
) -> str:
    """The content-addressed id of an inversion: 64 lowercase hexadecimal characters.

    A SHA-256 over a versioned encoding of the five inputs, each field tagged and prefixed
    with its length (so no two inputs collide by moving bytes from one field to the next).
    ``image_bytes`` is the image file as received (the same picture encoded twice differently
    gets two ids); ``options`` holds everything else that shapes the inversion (steps,
    guidance, schedule, seed, the method's own options) and, with ``model_fingerprint``
    (``editor.model.fingerprint()``), is encoded as sorted-key JSON, so key order does not
    matter but ``1`` and ``1.0`` differ. ``method`` is taken as given: pass the registry's
    canonical name so that an alias does not make a second id.
    """
    if not isinstance(image_bytes, bytes | bytearray | memoryview):
        raise PyinvError(f"image_bytes must be bytes, got {type(image_bytes).__name__}")
    digest = hashlib.sha256(_ID_DOMAIN)
    digest.update(_field(b"image", bytes(image_bytes)))
    digest.update(_field(b"prompt", _text(source_prompt, "source_prompt")))
    digest.update(_field(b"method", _text(method, "method")))
    digest.update(_field(b"options", _canonical(options, "options")))
    digest.update(_field(b"model", _canonical(model_fingerprint, "model_fingerprint")))
    return digest.hexdigest()


def check_id(inversion_id: Any) -> str:
    """``inversion_id`` when it is exactly 64 lowercase hexadecimal characters, else :class:`InvalidId`."""
    if not isinstance(inversion_id, str) or not _ID.fullmatch(inversion_id):
        shown = repr(inversion_id)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise InvalidId(f"not an inversion id (64 lowercase hexadecimal characters): {shown}")
    return inversion_id


# ---------------------------------------------------------------------- files
def _checksum(description: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a file's JSON description and its tensors (name, dtype, shape and bytes)."""
    digest = hashlib.sha256(_field(b"pyinv", description.encode("utf-8", "surrogatepass")))
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(_field(b"name", name.encode("utf-8")))
        digest.update(_field(b"dtype", str(tensor.dtype).encode()))
        digest.update(_field(b"shape", json.dumps(list(tensor.shape)).encode()))
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(b"data" + data.nbytes.to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def _encode(inversion: Inversion) -> bytes:
    """The bytes of the file of ``inversion``: Inversion's safetensors file plus its checksum."""
    from safetensors.torch import save

    tensors, meta = inversion.file_contents()
    meta = {**meta, CHECKSUM_KEY: _checksum(meta["pyinv"], tensors)}
    return save(tensors, metadata=meta)


def _decode(path: str) -> Inversion:
    """The inversion in the file at ``path``, checked by :meth:`Inversion.load` and by its
    checksum; any problem is a :class:`PyinvError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PyinvError(f"not a safetensors file ({str(exc).splitlines()[0]})") from None
    inversion = Inversion.load(path)
    expected = meta.get(CHECKSUM_KEY)
    if not isinstance(expected, str) or expected != _checksum(meta.get("pyinv", ""), inversion.tensors):
        raise PyinvError("its checksum does not match its contents")
    return inversion


def _write_partial(folder: str, data: bytes) -> str:
    """Write ``data`` to a new partial file in ``folder``, flushed to disk (fsync); returns its
    path. On failure nothing is left behind."""
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIXES[0], suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def _sync_folder(folder: str) -> None:
    """Flush a folder's entries (a rename, a removal) to disk, where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PyinvError(f"{what} must be a non-negative integer, got {value!r}")
    return value


# ---------------------------------------------------------------------- the store
class InversionStore:
    """Inversions by id: an in-memory LRU over an on-disk store under ``root`` (see the module).

    Args:
        root: the folder of the files (made if missing); ``None``: memory only.
        memory_items: how many inversions are kept in memory (the least recently used go first;
            ``0``: none, every ``get`` reads the disk).
        disk_bytes: the cap on the files' total size; after a ``put`` the least recently used
            files are deleted until the total fits. An inversion whose file alone passes the
            cap is kept in memory only.
        shared: other processes use the same root (see the module): look for files this
            store did not write, notice files they deleted, keep their young partial files.

    Thread-safe: one lock guards the memory LRU, the index of the files and the counters;
    encoding, writing and reading files happen outside it. ``get`` returns the stored object
    itself, not a copy: do not change it. Inversions read from disk have their tensors on the
    CPU; those given to ``put`` are kept as given.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        memory_items: int = DEFAULT_MEMORY_ITEMS,
        disk_bytes: int = DEFAULT_DISK_BYTES,
        shared: bool = False,
    ):
        self.memory_items = _check_count(memory_items, "memory_items")
        self.disk_bytes = _check_count(disk_bytes, "disk_bytes")
        self.shared = bool(shared)
        self.root = None if root is None else self._make_root(root)
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, Inversion] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()  # id → size, least recently used first
        self._disk_total = 0
        self._last_touch = 0
        self._hits = 0
        self._misses = 0
        if self.root is not None:
            with self._lock:
                self._scan(clean=True)
                self._evict_files(keep=None)

    # ------------------------------------------------------------------ public
    def get(self, inversion_id: str, fingerprint: Mapping[str, Any] | None = None) -> Inversion | None:
        """The inversion stored under ``inversion_id``, or ``None``.

        From memory, else from disk (read, checked, and kept in memory). A damaged file is
        deleted, logged and treated as absent. With ``fingerprint`` (``model.fingerprint()``),
        an inversion made with another model raises :class:`ModelMismatch` (and counts as a
        miss); the inversion stays stored, for the model it belongs to.
        """
        key = check_id(inversion_id)
        inversion = self._from_memory(key)
        if inversion is None:
            inversion = self._from_disk(key)
        found = inversion is not None
        matches = not found or fingerprint is None or fingerprints_match(inversion.model, dict(fingerprint))
        with self._lock:
            if found and matches:
                self._hits += 1
            else:
                self._misses += 1
        if not matches:
            raise ModelMismatch(
                f"inversion {key} was made with model {inversion.model.get('name')!r}, "
                f"not with the model being served ({fingerprint.get('name')!r}); invert the image again"
            )
        return inversion

    def put(self, inversion_id: str, inversion: Inversion) -> None:
        """Store ``inversion`` under ``inversion_id`` (replacing what was there), in memory
        and, with a root, on disk; then trim the disk to ``disk_bytes``.

        The inversion is checked first (:meth:`Inversion.check_tensors`: a bad one is a
        :class:`PyinvError`), so what a ``get`` returns from memory could also be read back
        from disk. A file that cannot be written is logged and the inversion kept in memory.
        """
        key = check_id(inversion_id)
        if not isinstance(inversion, Inversion):
            raise PyinvError(f"the store holds Inversion objects, got {type(inversion).__name__}")
        inversion.check_tensors(f"inversion {key}")
        with self._lock:
            self._remember(key, inversion)
        if self.root is not None:
            self._to_disk(key, inversion)

    def delete(self, inversion_id: str) -> bool:
        """Remove ``inversion_id`` from memory and disk; ``True`` if it was stored."""
        key = check_id(inversion_id)
        with self._lock:
            in_memory = self._memory.pop(key, None) is not None
            on_disk = self._forget_file(key)
            if not on_disk and self.shared and self.root is not None:  # another process's file
                on_disk = self._remove_unindexed(key)
        return in_memory or on_disk

    def __contains__(self, inversion_id: object) -> bool:
        """Whether ``inversion_id`` is in memory or has a file (not read: a damaged file
        counts until a ``get`` finds it damaged). Anything that is not an id is not contained."""
        if not isinstance(inversion_id, str) or not _ID.fullmatch(inversion_id):
            return False
        with self._lock:
            if inversion_id in self._memory or inversion_id in self._files:
                return True
        return self.shared and self.root is not None and os.path.isfile(self._file(inversion_id))

    def __len__(self) -> int:
        return len(self.ids())

    def ids(self) -> list[str]:
        """Every id stored, in memory or on disk, sorted (a shared store: on disk as of its
        last write or start)."""
        with self._lock:
            return sorted(set(self._memory) | set(self._files))

    def stats(self) -> dict[str, int]:
        """``hits`` and ``misses`` of ``get`` so far, ``memory_items`` held now, and
        ``disk_bytes`` and ``disk_files`` of the files under the root."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "memory_items": len(self._memory),
                "disk_bytes": self._disk_total,
                "disk_files": len(self._files),
            }

    def path_of(self, inversion_id: str) -> str:
        """The file of ``inversion_id`` under the root (whether or not it exists)."""
        if self.root is None:
            raise PyinvError("this inversion store keeps its inversions in memory only (no root)")
        return os.path.join(self.root, check_id(inversion_id) + _SUFFIX)

    # ------------------------------------------------------------------ memory
    def _remember(self, key: str, inversion: Inversion) -> None:
        """Put ``inversion`` in the memory LRU as the most recent; drop the oldest past the cap.
        The caller holds the lock."""
        self._memory[key] = inversion
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _from_memory(self, key: str) -> Inversion | None:
        with self._lock:
            inversion = self._memory.get(key)
            if inversion is None:
                return None
            if self.shared and key in self._files and not os.path.lexists(self._file(key)):
                # deleted or evicted by another process sharing the root: gone for all of them
                self._memory.pop(key, None)
                self._disk_total -= self._files.pop(key)
                return None
            self._memory.move_to_end(key)
            self._touch_file(key)
            return inversion

    # ------------------------------------------------------------------ disk
    @staticmethod
    def _make_root(root: str | os.PathLike) -> str:
        path = os.path.abspath(os.fspath(root))
        if "\0" in path:
            raise PyinvError(f"inversion store root contains a NUL character: {path!r}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise PyinvError(f"inversion store root is not a folder: {path}")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise PyinvError(f"cannot make the inversion store root {path}: {exc.strerror or exc}") from None
        return path

    def _scan(self, clean: bool) -> None:
        """Index the files under the root (oldest modification first), replacing the index;
        with ``clean``, remove the partial files a killed writer left (a shared store: only
        those older than :data:`SHARED_PARTIAL_AGE_S`). Links and other names are left
        alone, unread. The caller holds the lock."""
        found = []
        oldest_kept = time.time() - SHARED_PARTIAL_AGE_S
        with os.scandir(self.root) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if entry.name.startswith(PARTIAL_PREFIXES):
                        if clean and (not self.shared or entry.stat(follow_symlinks=False).st_mtime < oldest_kept):
                            self._remove_partial(entry.path)
                        continue
                    match = _FILE.fullmatch(entry.name)
                    if match:
                        info = entry.stat(follow_symlinks=False)
                        found.append((info.st_mtime_ns, match.group(1), info.st_size))
                except FileNotFoundError:  # removed meanwhile (by another process sharing the root)
                    continue
        if self.shared:  # indexed before, gone now: deleted or evicted by another process
            for key in set(self._files).difference(key for _, key, _ in found):
                self._memory.pop(key, None)
        self._files.clear()
        self._disk_total = 0
        for mtime, key, size in sorted(found):
            self._files[key] = size
            self._disk_total += size
            self._last_touch = max(self._last_touch, mtime)

    def _remove_unindexed(self, key: str) -> bool:
        """Remove ``key``'s file that this store has not indexed (a shared root); ``True`` if
        there was one. The caller holds the lock."""
        path = self._file(key)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            os.remove(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot remove the inversion file %s: %s", path, exc.strerror or exc)
            return False
        return True

    @staticmethod
    def _remove_partial(path: str) -> None:
        try:
            os.remove(path)
        except OSError as exc:
            log.warning("cannot remove the partial file %s: %s", path, exc.strerror or exc)
        else:
            log.info("removed the partial file %s (a write that did not finish)", path)

    def _file(self, key: str) -> str:
        return os.path.join(self.root, key + _SUFFIX)

    def _touch_file(self, key: str) -> None:
        """Make ``key``'s file the most recently used: last in the index, and a modification
        time later than any other this store set (so the order survives a restart). The
        caller holds the lock."""
        if key not in self._files:
            return
        self._files.move_to_end(key)
        self._last_touch = max(time.time_ns(), self._last_touch + 1)
        with contextlib.suppress(OSError):
            os.utime(self._file(key), ns=(self._last_touch, self._last_touch))

    def _forget_file(self, key: str) -> bool:
        """Delete ``key``'s file and its index entry; ``True`` if it was indexed. The caller
        holds the lock."""
        size = self._files.pop(key, None)
        if size is None:
            return False
        self._disk_total -= size
        try:
            os.remove(self._file(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the inversion file %s: %s", self._file(key), exc.strerror or exc)
        return True

    def _evict_files(self, keep: str | None) -> None:
        """Delete the least recently used files (never ``keep``) until the total fits the cap.
        The caller holds the lock."""
        for key in list(self._files):
            if self._disk_total <= self.disk_bytes:
                break
            if key != keep:
                self._forget_file(key)
                log.info("evicted inversion %s from disk (the store's files passed %d bytes)", key, self.disk_bytes)

    def _to_disk(self, key: str, inversion: Inversion) -> None:
        """Write ``inversion``'s file durably, index it as the most recent, and trim the disk."""
        data = _encode(inversion)
        if len(data) > self.disk_bytes:
            log.warning(
                "inversion %s is kept in memory only: its file (%d bytes) alone passes the store's cap (%d bytes)",
                key,
                len(data),
                self.disk_bytes,
            )
            return
        try:
            tmp = _write_partial(self.root, data)
        except OSError as exc:
            log.warning("inversion %s is kept in memory only: cannot write its file (%s)", key, exc.strerror or exc)
            return
        with self._lock:  # the rename and the index change together (an eviction never sees one alone)
            try:
                os.replace(tmp, self._file(key))
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                log.warning("inversion %s is kept in memory only: cannot write its file (%s)", key, exc.strerror or exc)
                return
            if self.shared:  # index every process's files, so the cap and the order cover them all
                self._scan(clean=False)
            self._disk_total += len(data) - self._files.pop(key, 0)
            self._files[key] = len(data)
            self._touch_file(key)
            self._evict_files(keep=key)
        _sync_folder(self.root)

    def _from_disk(self, key: str) -> Inversion | None:
        """Read ``key``'s file into memory; ``None`` when there is none or it is damaged."""
        if self.root is None:
            return None
        path = self._file(key)
        with self._lock:
            if key not in self._files:
                if not self.shared:
                    return None
                try:  # written by another process sharing the root?
                    info = os.lstat(path)
                except FileNotFoundError:
                    return None
                if not stat.S_ISREG(info.st_mode):
                    return None
                self._files[key] = info.st_size
                self._disk_total += info.st_size
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                raise PyinvError("not a regular file")
            inversion = _decode(path)
        except FileNotFoundError:
            info = None
            inversion = None
        except PyinvError as exc:
            self._drop_damaged(key, path, info, exc)
            return None
        with self._lock:
            if inversion is None:  # gone meanwhile: forget it, unless a put has just written it again
                if not os.path.lexists(path):
                    self._forget_file(key)
                return None
            if key in self._files or key in self._memory:  # not deleted meanwhile
                inversion = self._memory.get(key, inversion)  # a concurrent reader may have been first
                self._remember(key, inversion)
                self._touch_file(key)
        return inversion

    def _drop_damaged(self, key: str, path: str, info: os.stat_result, problem: Exception) -> None:
        """Delete a file that failed to read, unless it was removed or replaced meanwhile
        (renames happen under the lock, so a replaced file has another inode)."""
        with self._lock:
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                self._forget_file(key)
                return
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return
            self._forget_file(key)
        log.warning("deleted the damaged inversion file %s: %s", path, problem)
