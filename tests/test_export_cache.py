"""The export cache: hits reuse an entry, stale and corrupt entries are rebuilt in their
slot and never used, interrupted writes leave nothing behind, concurrent builds of one slot
end with one valid entry; with fake builders (small files) and with the tiny model's real
ONNX graphs."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_test_image

import pyinv
from pyinv.backends import cache as cache_module
from pyinv.backends import export
from pyinv.backends.cache import FORMAT, Entry, ExportCache, default_root
from pyinv.errors import PyinvError

WHAT = {"kind": "test", "graph": {"inputs": [[2, 4, 8, 8]]}}
KEY = {"versions": {"lib": "1.0"}}
FILES = {"graph.bin": b"graph " * 100, "weights.bin": bytes(range(256)) * 40}


class Builder:
    """A fake export: writes ``files`` into the entry's directory and counts its calls."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files = dict(FILES if files is None else files)
        self.calls = 0

    def __call__(self, directory: Path) -> None:
        self.calls += 1
        for name, data in self.files.items():
            (directory / name).write_bytes(data)


def never(directory: Path) -> None:
    raise AssertionError("the builder must not run on a cache hit")


def partials(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".partial-")) if root.exists() else []


@pytest.fixture
def cache(tmp_path) -> ExportCache:
    return ExportCache(tmp_path / "exports")


@pytest.fixture
def built(cache) -> Entry:
    """One valid entry of ``WHAT`` under ``KEY``."""
    entry = cache.get_or_build(WHAT, KEY, Builder())
    assert entry.built
    return entry


def assert_entry_holds(entry: Entry, files: dict[str, bytes]) -> None:
    on_disk = {p.name for p in entry.path.iterdir()}
    assert on_disk == {*files, "meta.json"}
    for name, data in files.items():
        assert entry.file(name).read_bytes() == data


# ---------------------------------------------------------------------- hits
def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYINV_CACHE_DIR", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c" / "exports"
    assert ExportCache().root == tmp_path / "c" / "exports"
    monkeypatch.delenv("PYINV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "pyinv" / "exports"


def test_a_build_writes_a_whole_entry(cache):
    builder = Builder()
    entry = cache.get_or_build(WHAT, KEY, builder)
    assert entry.built and builder.calls == 1 and entry.seconds >= 0
    assert entry.path == cache.root / cache.slot_of(WHAT)
    assert_entry_holds(entry, FILES)
    meta = json.loads(entry.file("meta.json").read_text())
    assert meta["key"] == {"format": FORMAT, **KEY}
    assert meta["what"] == {"format": FORMAT, **WHAT}
    assert set(meta["files"]) == set(FILES)
    assert entry.size_bytes == sum(len(d) for d in FILES.values())
    assert cache.entries() == [entry.path]
    assert partials(cache.root) == []


def test_a_hit_reuses_the_entry_without_building(cache, built):
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.path.iterdir()}
    again = cache.get_or_build(WHAT, KEY, never)
    assert again == Entry(built.path, built=False)
    assert cache.lookup(WHAT, KEY) == again
    assert cache.validate(built.path, KEY, WHAT) is None
    assert {p.name: p.stat().st_mtime_ns for p in built.path.iterdir()} == mtimes
    # another instance on the same root sees it too
    assert ExportCache(cache.root).get_or_build(WHAT, KEY, never).path == built.path


def test_slots_depend_on_what_only(cache):
    assert cache.slot_of(WHAT) == ExportCache(cache.root / "elsewhere").slot_of(dict(reversed(WHAT.items())))
    assert cache.slot_of(WHAT) != cache.slot_of({**WHAT, "kind": "other"})
    a = cache.get_or_build(WHAT, KEY, Builder())
    b = cache.get_or_build({**WHAT, "kind": "other"}, KEY, Builder())
    assert a.path != b.path and len(cache.entries()) == 2


# ---------------------------------------------------------------------- stale
def test_another_key_rebuilds_in_the_same_slot(cache, built, caplog):
    new_key = {"versions": {"lib": "2.0"}}
    assert cache.lookup(WHAT, new_key) is None
    builder = Builder({"graph.bin": b"new graph", "other.bin": b"x"})
    with caplog.at_level(logging.WARNING, logger="pyinv.backends.cache"):
        entry = cache.get_or_build(WHAT, new_key, builder)
    assert "another key" in caplog.text
    assert entry.built and builder.calls == 1 and entry.path == built.path
    assert_entry_holds(entry, builder.files)  # weights.bin of the old entry is gone
    assert cache.lookup(WHAT, KEY) is None  # the old key's entry was replaced
    assert cache.entries() == [entry.path] and partials(cache.root) == []


def test_a_library_version_in_graph_key_makes_entries_stale(cache, monkeypatch):
    key = export.graph_key()
    assert export.graph_key() == key  # the same in every call
    cache.get_or_build(WHAT, key, Builder())
    assert cache.lookup(WHAT, export.graph_key()) is not None
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    stale = export.graph_key()
    assert stale["versions"]["torch"] == "0.0.1-other"
    assert cache.lookup(WHAT, stale) is None
    builder = Builder({"graph.bin": b"rebuilt"})
    assert cache.get_or_build(WHAT, stale, builder).built and builder.calls == 1
    assert cache.get_or_build(WHAT, stale, never).file("graph.bin").read_bytes() == b"rebuilt"
    monkeypatch.setattr(export, "package_version", lambda name: "9.9")
    assert cache.lookup(WHAT, export.graph_key()) is None


# ---------------------------------------------------------------------- corrupt
def _truncate(path: Path) -> str:
    f = path / "weights.bin"
    f.write_bytes(f.read_bytes()[:-7])
    return "does not match"


def _flip(path: Path) -> str:
    f = path / "weights.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash tells
    f.write_bytes(bytes(data))
    return "does not match"


def _delete(path: Path) -> str:
    (path / "graph.bin").unlink()
    return "missing"


def _dir_for_file(path: Path) -> str:
    (path / "graph.bin").unlink()
    (path / "graph.bin").mkdir()
    return "missing"


def _garbage_meta(path: Path) -> str:
    (path / "meta.json").write_bytes(b"\x00\xff{not json")
    return "unreadable"


def _no_meta(path: Path) -> str:
    (path / "meta.json").unlink()
    return "no meta file"


def _meta_edit(change):
    def damage(path: Path) -> str:
        meta = json.loads((path / "meta.json").read_text())
        change(meta)
        (path / "meta.json").write_text(json.dumps(meta))
        return "malformed"

    return damage


def _no_files(meta):
    meta["files"] = {}


def _files_not_a_dict(meta):
    meta["files"] = ["graph.bin"]


def _file_entry_not_a_dict(meta):
    meta["files"]["graph.bin"] = 3


def _path_outside(meta):
    meta["files"]["../graph.bin"] = meta["files"].pop("graph.bin")


def _no_key(meta):
    del meta["key"]


def _meta_a_list(path: Path) -> str:
    (path / "meta.json").write_text("[1, 2]")
    return "malformed"


def _slot_a_file(path: Path) -> str:
    import shutil

    shutil.rmtree(path)
    path.write_bytes(b"not an entry")
    return "not a directory"


DAMAGE = {
    "truncated": _truncate,
    "byte-flipped": _flip,
    "file-deleted": _delete,
    "file-a-directory": _dir_for_file,
    "meta-garbage": _garbage_meta,
    "meta-missing": _no_meta,
    "meta-a-list": _meta_a_list,
    "meta-no-files": _meta_edit(_no_files),
    "meta-files-not-a-dict": _meta_edit(_files_not_a_dict),
    "meta-file-entry-not-a-dict": _meta_edit(_file_entry_not_a_dict),
    "meta-path-outside": _meta_edit(_path_outside),
    "meta-no-key": _meta_edit(_no_key),
    "slot-a-file": _slot_a_file,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_corrupt_entry_is_detected_and_rebuilt(cache, built, damage, caplog):
    reason = damage(built.path)
    problem = cache.validate(built.path, KEY, WHAT)
    assert problem is not None and reason in problem
    with caplog.at_level(logging.WARNING, logger="pyinv.backends.cache"):
        assert cache.lookup(WHAT, KEY) is None  # never used
    assert reason in caplog.text and str(built.path) in caplog.text
    builder = Builder()
    entry = cache.get_or_build(WHAT, KEY, builder)
    assert entry.built and builder.calls == 1 and entry.path == built.path
    assert_entry_holds(entry, FILES)
    assert cache.validate(entry.path, KEY, WHAT) is None
    assert cache.get_or_build(WHAT, KEY, never) == Entry(entry.path, built=False)
    assert partials(cache.root) == []


def test_an_entry_copied_into_another_slot_is_not_used(cache, built, caplog):
    import shutil

    other = {**WHAT, "kind": "other"}
    shutil.copytree(built.path, cache.root / cache.slot_of(other))
    with caplog.at_level(logging.WARNING, logger="pyinv.backends.cache"):
        assert cache.lookup(other, KEY) is None
    assert "another graph or model" in caplog.text
    assert cache.get_or_build(other, KEY, Builder({"graph.bin": b"mine"})).built


# ---------------------------------------------------------------------- interrupted
class Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_a_builder_failing_mid_write_leaves_nothing(cache, error):
    def build(directory: Path) -> None:
        (directory / "graph.bin").write_bytes(b"half")
        with open(directory / "weights.bin", "wb") as f:
            f.write(b"some of the weights")
            raise error("stopped")

    with pytest.raises(error):
        cache.get_or_build(WHAT, KEY, build)
    assert cache.lookup(WHAT, KEY) is None
    assert cache.entries() == [] and partials(cache.root) == []
    assert list(cache.root.iterdir()) == []
    assert cache.get_or_build(WHAT, KEY, Builder()).built  # the next build is not hindered


def test_a_failed_rebuild_keeps_no_half_entry(cache, built):
    def build(directory: Path) -> None:
        (directory / "graph.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build(WHAT, {"versions": {"lib": "2.0"}}, build)
    assert partials(cache.root) == []
    assert cache.lookup(WHAT, {"versions": {"lib": "2.0"}}) is None
    assert cache.lookup(WHAT, KEY) is not None  # the older entry was left as it was


def test_a_builder_writing_nothing_is_an_error(cache):
    with pytest.raises(PyinvError, match="wrote no file"):
        cache.get_or_build(WHAT, KEY, lambda directory: None)
    assert list(cache.root.iterdir()) == []


def _killed_write(cache: ExportCache, pid: int = 999_999) -> Path:
    """What a process killed mid-write leaves: a partial directory of the slot (here even
    with a complete-looking meta file)."""
    source = ExportCache(cache.root.parent / "elsewhere").get_or_build(WHAT, KEY, Builder())
    partial = cache.root / f".partial-{cache.slot_of(WHAT)}-{pid}-0123abcd"
    cache.root.mkdir(parents=True, exist_ok=True)
    partial.mkdir()
    for p in source.path.iterdir():
        (partial / p.name).write_bytes(p.read_bytes())
    return partial


def test_a_partial_directory_is_ignored_and_cleaned(cache):
    partial = _killed_write(cache)
    old = cache.root / f".partial-old-{cache.slot_of(WHAT)}-89abcdef"
    old.mkdir()
    (old / "graph.bin").write_bytes(b"left over")
    stray = cache.root / ".partial-stray-file"
    stray.write_bytes(b"x")
    assert cache.lookup(WHAT, KEY) is None and cache.entries() == []
    builder = Builder({"graph.bin": b"built"})
    entry = cache.get_or_build(WHAT, KEY, builder)
    assert builder.calls == 1 and entry.file("graph.bin").read_bytes() == b"built"
    assert cache.entries() == [entry.path]
    # young partial directories may be writes in progress: kept
    assert cache.clean_partial() == 0 and partial.exists()
    past = time.time() - 2 * 3600
    for p in (partial, old, stray):
        os.utime(p, (past, past))
    assert cache.clean_partial() == 3
    assert partials(cache.root) == []
    assert cache.get_or_build(WHAT, KEY, never) == Entry(entry.path, built=False)
    assert ExportCache(cache.root / "missing").clean_partial() == 0


def test_clean_partial_with_no_age_removes_all(cache, built):
    _killed_write(cache)
    assert cache.clean_partial(older_than_s=0) == 1
    assert partials(cache.root) == [] and cache.entries() == [built.path]


# ---------------------------------------------------------------------- concurrent builds
def test_two_threads_building_one_slot_end_with_one_entry(cache):
    both_inside = threading.Barrier(2, timeout=30)
    builders = [Builder({"graph.bin": b"from thread 0"}), Builder({"graph.bin": b"from thread 1"})]
    results: list[Entry | BaseException] = [None, None]  # type: ignore[list-item]

    def work(k: int) -> None:
        def build(directory: Path) -> None:
            builders[k](directory)
            both_inside.wait()  # both threads missed the lookup and are building

        try:
            results[k] = cache.get_or_build(WHAT, KEY, build)
        except BaseException as exc:
            results[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, Entry) for r in results), results
    assert [b.calls for b in builders] == [1, 1]
    assert sorted(r.built for r in results) == [False, True]  # one installed, one kept it
    assert results[0].path == results[1].path
    assert cache.entries() == [results[0].path] and partials(cache.root) == []
    assert cache.validate(results[0].path, KEY, WHAT) is None
    assert cache.get_or_build(WHAT, KEY, never).file("graph.bin").read_bytes() in (b"from thread 0", b"from thread 1")


def test_an_entry_installed_by_another_process_meanwhile_is_kept(cache, monkeypatch):
    """Another process renames its entry into the slot between this one's check and its
    rename (a directory is not renamed onto a non-empty one): this one keeps that entry."""
    real_replace = os.replace
    final = cache.root / cache.slot_of(WHAT)
    theirs = ExportCache(cache.root.parent / "other-process").get_or_build(WHAT, KEY, Builder({"graph.bin": b"theirs"}))
    raced = []

    def replace(src, dst):
        if Path(dst) == final and not raced:
            raced.append(True)
            real_replace(theirs.path, final)  # the other process's rename comes first
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", replace)
    entry = cache.get_or_build(WHAT, KEY, Builder({"graph.bin": b"mine"}))
    monkeypatch.undo()
    assert raced and not entry.built
    assert entry.file("graph.bin").read_bytes() == b"theirs"
    assert cache.entries() == [final] and partials(cache.root) == []


def test_removing_an_entry(cache, built):
    cache.remove(built)
    assert not built.path.exists() and list(cache.root.iterdir()) == []
    cache.remove(built)  # already gone: nothing to do


# ---------------------------------------------------------------------- the real graphs
needs_ort = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnxscript")),
    reason="the onnxruntime backend needs pyinv[export]",
)
SRC = "a photo of a cat"
TGT = "a photo of a dog"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model's graphs of a direct inversion and a P2P edit, exported into a fresh
    cache: ``(cache root, inversion, edit latents, [(signature, entry)] built)``."""
    from pyinv.backends import OnnxRuntimeBackend

    root = tmp_path_factory.mktemp("ort-cache")
    backend = OnnxRuntimeBackend(cache=root)
    editor = pyinv.Editor.from_pretrained("tiny", backend=backend)
    inv = editor.invert(make_test_image(32), SRC, method="direct", steps=4, seed=0)
    latents = editor.edit_latents(inv, TGT, control=pyinv.P2P(), seed=0).targets
    assert backend.found == []
    return root, inv, latents, list(backend.built)


def _edit_on_a_new_backend(root: Path, inv):
    from pyinv.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(cache=root)
    editor = pyinv.Editor.from_pretrained("tiny", backend=backend)
    return backend, editor.edit_latents(inv, TGT, control=pyinv.P2P(), seed=0).targets


@needs_ort
def test_real_graphs_are_exported_once_and_reused(exported):
    root, inv, latents, built = exported
    assert [s.describe() for s, _ in built] == ["R=1 16×16 plain", "R=3 16×16 p2p(cross,self)"]
    cache = ExportCache(root)
    assert sorted(e.path for _, e in built) == cache.entries()
    for _, entry in built:
        assert entry.built and entry.file(export.GRAPH_FILE).is_file()
        assert entry.file(export.GRAPH_FILE + ".data").is_file()
    backend, again = _edit_on_a_new_backend(root, inv)
    assert backend.built == []  # a hit: nothing exported
    assert [s for s, _ in backend.found] == [built[1][0]]
    torch.testing.assert_close(again, latents, rtol=1e-6, atol=1e-7)


@needs_ort
def test_a_corrupt_real_graph_is_rebuilt_and_never_used(exported, caplog):
    root, inv, latents, built = exported
    signature, entry = built[1]  # the edit's P2P graph
    weights = entry.file(export.GRAPH_FILE + ".data")
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="pyinv.backends.cache"):
        backend, again = _edit_on_a_new_backend(root, inv)
    assert "unet.onnx.data does not match" in caplog.text
    assert [(s, e.path) for s, e in backend.built] == [(signature, entry.path)]  # rebuilt in its slot
    assert backend.found == []
    assert ExportCache(root).validate(entry.path, export.graph_key(optimize=False)) is None
    torch.testing.assert_close(again, latents, rtol=1e-5, atol=1e-6)
    backend, _ = _edit_on_a_new_backend(root, inv)
    assert backend.built == [] and len(backend.found) == 1
