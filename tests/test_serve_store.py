"""The service's inversion cache: content-addressed ids, the memory LRU over the disk store,
its size cap, restarts, damaged and partial files, refused ids, and threads.

Three real inversions of the tiny model (Direct Inversion, 3 steps) are made once.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_test_image

from pyinv import PyinvError
from pyinv.inversion import Inversion
from pyinv.serve import store as store_module
from pyinv.serve.store import (
    PARTIAL_PREFIXES,
    InvalidId,
    InversionStore,
    ModelMismatch,
    check_id,
    inversion_id,
)

PROMPTS = ("a photo of a red ball", "a photo of a blue cube", "a painting of a green hill")


@pytest.fixture(scope="module")
def fingerprint(editor) -> dict:
    return editor.model.fingerprint()


@pytest.fixture(scope="module")
def stored(editor, fingerprint) -> dict[str, Inversion]:
    """Three inversions (one image seed and prompt each) by their ids."""
    out = {}
    for k, prompt in enumerate(PROMPTS):
        image = make_test_image(seed=k)
        inv = editor.invert(image, prompt, method="direct", steps=3)
        out[inversion_id(image.tobytes(), prompt, "direct", {"steps": 3}, fingerprint)] = inv
    return out


@pytest.fixture(scope="module")
def file_size(stored, tmp_path_factory) -> dict[str, int]:
    """The size of each inversion's file in a store."""
    store = InversionStore(tmp_path_factory.mktemp("sizes"))
    for key, inv in stored.items():
        store.put(key, inv)
    return {key: os.path.getsize(store.path_of(key)) for key in stored}


def assert_same(a: Inversion, b: Inversion) -> None:
    assert a.metadata() == b.metadata()
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype
        assert torch.equal(a.tensors[name].cpu(), b.tensors[name].cpu()), name


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------------- ids
ID_ARGS = dict(
    image_bytes=b"\x89PNG...pixels",
    source_prompt="a photo of a cat",
    method="direct",
    options={"steps": 50, "guidance": 7.5, "form": "pinned"},
    model_fingerprint={"name": "tiny", "config_sha256": "ab" * 32, "weight_sample": [0.1, -0.2]},
)


def test_id_is_deterministic_hex():
    first = inversion_id(**ID_ARGS)
    assert first == inversion_id(**ID_ARGS)
    assert check_id(first) == first and len(first) == 64


def test_id_ignores_key_order():
    options = dict(reversed(list(ID_ARGS["options"].items())))
    model = dict(reversed(list(ID_ARGS["model_fingerprint"].items())))
    assert inversion_id(**{**ID_ARGS, "options": options, "model_fingerprint": model}) == inversion_id(**ID_ARGS)


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_bytes", b"\x89PNG...pixelz"),
        ("image_bytes", b""),
        ("source_prompt", "a photo of a dog"),
        ("source_prompt", ""),
        ("method", "null-text"),
        ("options", {"steps": 49, "guidance": 7.5, "form": "pinned"}),
        ("options", {"steps": 50, "guidance": 7.5, "form": "pinned", "seed": 0}),
        ("options", {"steps": 50.0, "guidance": 7.5, "form": "pinned"}),
        ("model_fingerprint", {"name": "tiny", "config_sha256": "ab" * 32, "weight_sample": [0.1, -0.3]}),
        ("model_fingerprint", {"name": "other", "config_sha256": "ab" * 32, "weight_sample": [0.1, -0.2]}),
    ],
)
def test_id_changes_with_each_input(field, value):
    assert inversion_id(**{**ID_ARGS, field: value}) != inversion_id(**ID_ARGS)


def test_id_fields_do_not_run_together():
    ids = {
        inversion_id(b"ab", "c", "direct", {}, {}),
        inversion_id(b"a", "bc", "direct", {}, {}),
        inversion_id(b"a", "b", "cdirect", {}, {}),
        inversion_id(b"a", "bcdirect", "", {}, {}),
        inversion_id(b"", "", "", {}, {}),
        inversion_id(b"", "", "", {"": ""}, {}),
        inversion_id(b"", "", "", {}, {"": ""}),
    }
    assert len(ids) == 7


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_bytes", "not bytes"),
        ("source_prompt", None),
        ("method", 3),
        ("options", [("steps", 3)]),
        ("options", {"guidance": float("nan")}),
        ("options", {"f": object()}),
        ("model_fingerprint", None),
    ],
)
def test_id_refuses_bad_inputs(field, value):
    with pytest.raises(PyinvError):
        inversion_id(**{**ID_ARGS, field: value})


def test_id_of_the_same_inversion_twice(editor, fingerprint, image):
    """Two requests for the same inversion get the same id; another model gets another."""
    args = (image.tobytes(), PROMPTS[0], "direct", {"steps": 3})
    assert inversion_id(*args, fingerprint) == inversion_id(*args, editor.model.fingerprint())
    assert inversion_id(*args, fingerprint) != inversion_id(*args, {**fingerprint, "name": "tiny-v"})


# ---------------------------------------------------------------------- refused ids
BAD_IDS = [
    "",
    "a" * 63,
    "a" * 65,
    "A" * 64,
    "aB" * 32,
    "g" * 64,
    " " + "a" * 63,
    "a" * 64 + "\n",
    "a" * 63 + "\n",
    "a" * 63 + "\0",
    "../" + "a" * 61,
    "../x",
    "..",
    "/etc/passwd",
    "/" + "a" * 63,
    "a" * 32 + "/" + "a" * 31,
    "%2e%2e%2f" + "a" * 55,
    "..%2f" + "a" * 59,
    "a" * 60 + ".tmp",
    "\u0663" * 64,  # Arabic-Indic digit three
    "ａ" * 64,  # fullwidth a
    b"a" * 64,
    None,
    64,
    ["a" * 64],
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:24] for b in BAD_IDS])
def test_bad_ids_are_refused(bad, stored, tmp_path):
    root = tmp_path / "store"
    store = InversionStore(root)
    inv = next(iter(stored.values()))
    before = listing(tmp_path)
    with pytest.raises(InvalidId):
        store.get(bad)
    with pytest.raises(InvalidId):
        store.put(bad, inv)
    with pytest.raises(InvalidId):
        store.delete(bad)
    with pytest.raises(InvalidId):
        store.path_of(bad)
    assert bad not in store
    assert listing(tmp_path) == before == {"store"}
    assert store.ids() == [] and store.stats()["memory_items"] == 0
    assert issubclass(InvalidId, PyinvError)


def test_files_stay_in_the_root(stored, tmp_path):
    root = tmp_path / "store"
    store = InversionStore(root, memory_items=1)
    for key, inv in stored.items():
        store.put(key, inv)
        assert os.path.dirname(store.path_of(key)) == str(root)
    assert listing(tmp_path) == {"store"} | {f"store/{k}.safetensors" for k in stored}


# ---------------------------------------------------------------------- round trips
def test_round_trip_in_memory(stored):
    store = InversionStore(None)
    for key, inv in stored.items():
        store.put(key, inv)
    for key, inv in stored.items():
        assert key in store
        assert store.get(key) is inv
    assert store.ids() == sorted(stored)
    assert store.stats() == {"hits": 3, "misses": 0, "memory_items": 3, "disk_bytes": 0, "disk_files": 0}


def test_round_trip_through_disk_after_restart(stored, tmp_path):
    first = InversionStore(tmp_path)
    for key, inv in stored.items():
        first.put(key, inv)
    del first
    store = InversionStore(tmp_path)  # a restart: nothing in memory
    assert store.ids() == sorted(stored)
    assert all(key in store for key in stored)
    assert store.stats()["memory_items"] == 0 and store.stats()["disk_files"] == 3
    for key, inv in stored.items():
        got = store.get(key)
        assert_same(got, inv)
        assert store.get(key) is got  # now from memory
    assert store.stats()["hits"] == 6 and store.stats()["memory_items"] == 3


def test_a_put_replaces(stored, tmp_path):
    (k1, a), (_, b) = list(stored.items())[:2]
    store = InversionStore(tmp_path)
    store.put(k1, a)
    store.put(k1, b)
    assert store.get(k1) is b
    assert_same(InversionStore(tmp_path).get(k1), b)
    assert store.stats()["disk_files"] == 1


def test_put_refuses_what_is_not_a_good_inversion(stored, tmp_path):
    store = InversionStore(tmp_path)
    key, inv = next(iter(stored.items()))
    with pytest.raises(PyinvError, match="Inversion objects"):
        store.put(key, {"z0": inv.z0})
    bad = Inversion(**{**inv.__dict__, "tensors": {**inv.tensors, "z0": inv.z0 * float("nan")}})
    with pytest.raises(PyinvError, match="non-finite"):
        store.put(key, bad)
    assert store.ids() == [] and os.listdir(tmp_path) == []


def test_model_fingerprint_check(stored, fingerprint, editor_v, tmp_path):
    store = InversionStore(tmp_path)
    key, inv = next(iter(stored.items()))
    store.put(key, inv)
    assert store.get(key, fingerprint=fingerprint) is inv
    with pytest.raises(ModelMismatch, match="another|not with the model"):
        store.get(key, fingerprint=editor_v.model.fingerprint())
    assert issubclass(ModelMismatch, PyinvError)
    assert key in store  # still stored, for its own model
    assert_same(InversionStore(tmp_path).get(key, fingerprint=fingerprint), inv)
    assert store.stats()["hits"] == 1 and store.stats()["misses"] == 1


# ---------------------------------------------------------------------- memory LRU
def test_memory_lru_falls_back_to_disk(stored, tmp_path):
    (a, inv_a), (b, inv_b), (c, inv_c) = stored.items()
    store = InversionStore(tmp_path, memory_items=2)
    store.put(a, inv_a)
    store.put(b, inv_b)
    assert store.get(a) is inv_a  # a is now the most recent: b goes next
    store.put(c, inv_c)
    assert store.stats()["memory_items"] == 2
    assert store.get(a) is inv_a and store.get(c) is inv_c
    from_disk = store.get(b)
    assert from_disk is not inv_b
    assert_same(from_disk, inv_b)
    assert store.get(b) is from_disk  # kept in memory; a was the oldest and left
    assert store.get(a) is not inv_a
    assert store.stats()["hits"] == 6 and store.stats()["misses"] == 0


def test_memory_only_store_forgets_the_oldest(stored):
    (a, inv_a), (b, inv_b), (c, inv_c) = stored.items()
    store = InversionStore(None, memory_items=2)
    for key, inv in stored.items():
        store.put(key, inv)
    assert store.get(a) is None
    assert a not in store and store.ids() == sorted([b, c])
    assert store.get(b) is inv_b and store.get(c) is inv_c
    assert store.stats() == {"hits": 2, "misses": 1, "memory_items": 2, "disk_bytes": 0, "disk_files": 0}


# ---------------------------------------------------------------------- disk cap
def test_disk_cap_evicts_the_least_recently_used(stored, file_size, tmp_path):
    (a, inv_a), (b, inv_b), (c, inv_c) = stored.items()
    cap = sum(file_size.values()) - 1  # any two files fit, not three
    store = InversionStore(tmp_path, memory_items=1, disk_bytes=cap)
    store.put(a, inv_a)
    store.put(b, inv_b)
    assert store.get(a) is not None  # from disk: a is now more recent than b
    store.put(c, inv_c)
    assert sorted(os.listdir(tmp_path)) == sorted([f"{a}.safetensors", f"{c}.safetensors"])
    assert store.stats()["disk_bytes"] == file_size[a] + file_size[c] <= cap
    assert store.stats()["disk_files"] == 2
    assert store.get(b) is None and b not in store

    # the order survives a restart (file modification times): a is older than c
    again = InversionStore(tmp_path, memory_items=1, disk_bytes=cap)
    again.put(b, inv_b)
    assert sorted(again.ids()) == sorted([b, c])
    assert not os.path.exists(again.path_of(a))


def test_a_get_from_memory_refreshes_the_file(stored, file_size, tmp_path):
    (a, inv_a), (b, inv_b), (c, inv_c) = stored.items()
    cap = sum(file_size.values()) - 1
    store = InversionStore(tmp_path, memory_items=8, disk_bytes=cap)
    store.put(a, inv_a)
    store.put(b, inv_b)
    assert store.get(a) is inv_a  # a memory hit still counts as a use of a's file
    store.put(c, inv_c)
    assert not os.path.exists(store.path_of(b))
    assert os.path.exists(store.path_of(a)) and os.path.exists(store.path_of(c))


def test_a_lower_cap_trims_the_disk_on_start(stored, file_size, tmp_path):
    keys = list(stored)
    store = InversionStore(tmp_path)
    for key in keys:
        store.put(key, stored[key])
    smaller = InversionStore(tmp_path, disk_bytes=file_size[keys[2]])
    assert smaller.ids() == [keys[2]]


def test_a_file_over_the_cap_stays_in_memory_only(stored, file_size, tmp_path, caplog):
    key, inv = next(iter(stored.items()))
    store = InversionStore(tmp_path, disk_bytes=file_size[key] - 1)
    with caplog.at_level(logging.WARNING, logger="pyinv.serve.store"):
        store.put(key, inv)
    assert "memory only" in caplog.text and key in caplog.text
    assert os.listdir(tmp_path) == []
    assert store.get(key) is inv
    assert store.stats()["disk_files"] == 0 and store.stats()["disk_bytes"] == 0


# ---------------------------------------------------------------------- damage
def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(at: int):
    def change(data: bytes) -> bytes:
        pos = at % len(data)
        return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]

    return change


DAMAGE = {
    "truncated": _truncate,
    "empty": lambda data: b"",
    "garbage": lambda data: os.urandom(len(data)),
    "header length": _flip(0),
    "header byte": _flip(40),
    "last tensor byte": _flip(-1),
    "middle tensor byte": _flip(-2000),
    "no checksum": None,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_absent_and_removed(damage, stored, tmp_path, caplog):
    key, inv = next(iter(stored.items()))
    InversionStore(tmp_path).put(key, inv)
    path = Path(tmp_path, f"{key}.safetensors")
    if DAMAGE[damage] is None:  # a good inversion file the store did not write
        path.unlink()
        inv.save(path)
    else:
        path.write_bytes(DAMAGE[damage](path.read_bytes()))
    store = InversionStore(tmp_path)
    assert key in store  # not read yet
    with caplog.at_level(logging.WARNING, logger="pyinv.serve.store"):
        assert store.get(key) is None
    assert "damaged" in caplog.text
    assert not path.exists() and key not in store
    assert store.stats() == {"hits": 0, "misses": 1, "memory_items": 0, "disk_bytes": 0, "disk_files": 0}
    store.put(key, inv)  # made again
    assert_same(InversionStore(tmp_path).get(key), inv)


def test_a_changed_description_is_damage(stored, tmp_path):
    """An edit of the JSON description that keeps a valid record (a prompt changed) is caught
    by the checksum."""
    key, inv = next(iter(stored.items()))
    InversionStore(tmp_path).put(key, inv)
    path = Path(tmp_path, f"{key}.safetensors")
    data = path.read_bytes()
    old = PROMPTS[0].encode()
    assert old in data
    path.write_bytes(data.replace(old, old.replace(b"red", b"rod"), 1))
    assert Inversion.load(path).source_prompt != PROMPTS[0]  # a valid record, by itself
    assert InversionStore(tmp_path).get(key) is None
    assert not path.exists()


def test_partial_files_are_ignored_and_cleaned(stored, tmp_path):
    key, inv = next(iter(stored.items()))
    InversionStore(tmp_path).put(key, inv)
    partial = [tmp_path / f"{PARTIAL_PREFIXES[0]}x1y2.tmp", tmp_path / f"{PARTIAL_PREFIXES[1]}abc.safetensors"]
    for path in partial:
        path.write_bytes(b"half a file")
    other = tmp_path / "notes.txt"
    other.write_text("not the store's")
    store = InversionStore(tmp_path)
    assert not any(path.exists() for path in partial)
    assert other.exists()
    assert store.ids() == [key]
    assert store.stats()["disk_files"] == 1
    assert_same(store.get(key), inv)


def test_links_are_not_followed(stored, tmp_path):
    """A link named like an entry is never read, and removing it leaves its target alone."""
    root, outside = tmp_path / "store", tmp_path / "outside.safetensors"
    key, inv = next(iter(stored.items()))
    inv.save(outside)
    root.mkdir()
    (root / f"{key}.safetensors").symlink_to(outside)
    store = InversionStore(root)
    assert store.ids() == [] and store.get(key) is None
    store.put(key, inv)  # replaces the link with a file
    assert not (root / f"{key}.safetensors").is_symlink()
    assert outside.exists()
    assert_same(Inversion.load(outside), inv)


# ---------------------------------------------------------------------- delete, stats, arguments
def test_delete(stored, tmp_path):
    (a, inv_a), (b, inv_b), _ = stored.items()
    store = InversionStore(tmp_path)
    store.put(a, inv_a)
    store.put(b, inv_b)
    assert store.delete(a) is True
    assert store.delete(a) is False
    assert a not in store and store.get(a) is None
    assert os.listdir(tmp_path) == [f"{b}.safetensors"]
    assert InversionStore(tmp_path).ids() == [b]
    assert InversionStore(None).delete(a) is False


def test_stats_count(stored, file_size, tmp_path):
    (a, inv_a), (b, inv_b), (c, _) = stored.items()
    store = InversionStore(tmp_path, memory_items=1)
    assert store.stats() == {"hits": 0, "misses": 0, "memory_items": 0, "disk_bytes": 0, "disk_files": 0}
    store.put(a, inv_a)
    store.put(b, inv_b)
    store.get(a)  # disk
    store.get(a)  # memory
    store.get(c)  # absent
    assert store.stats() == {
        "hits": 2,
        "misses": 1,
        "memory_items": 1,
        "disk_bytes": file_size[a] + file_size[b],
        "disk_files": 2,
    }
    assert store.stats()["disk_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert len(store) == 2


@pytest.mark.parametrize(
    "kwargs", [{"memory_items": -1}, {"memory_items": 1.5}, {"disk_bytes": -1}, {"disk_bytes": True}]
)
def test_bad_sizes(kwargs, tmp_path):
    with pytest.raises(PyinvError):
        InversionStore(tmp_path, **kwargs)


def test_root_must_be_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(PyinvError, match="not a folder"):
        InversionStore(path)
    with pytest.raises(PyinvError, match="memory only"):
        InversionStore(None).path_of("a" * 64)
    InversionStore(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper").is_dir()


# ---------------------------------------------------------------------- threads
def test_concurrent_puts_and_gets(stored, file_size, tmp_path):
    """Threads putting, getting and deleting through a small memory and a small disk: no
    exception, and every get returns nothing or exactly what was put under its id."""
    keys = list(stored)
    store = InversionStore(tmp_path, memory_items=1, disk_bytes=sum(file_size.values()) - 1)
    errors: list[BaseException] = []
    gets = [0] * 8

    def work(n: int) -> None:
        rng = random.Random(n)
        try:
            for _ in range(40):
                key = rng.choice(keys)
                action = rng.random()
                if action < 0.4:
                    store.put(key, stored[key])
                elif action < 0.95:
                    gets[n] += 1
                    got = store.get(key)
                    if got is not None:
                        assert_same(got, stored[key])
                else:
                    store.delete(key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = store.stats()
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert stats["memory_items"] <= 1
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == sorted(f"{k}.safetensors" for k in InversionStore(tmp_path).ids())
    assert stats["disk_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir()) <= store.disk_bytes
    assert not any(name.startswith(PARTIAL_PREFIXES) for name in on_disk)
    for key in InversionStore(tmp_path).ids():
        assert_same(InversionStore(tmp_path).get(key), stored[key])


# ---------------------------------------------------------------------- a root shared between processes
# Two InversionStore objects on one root stand for two processes: each has its own lock,
# memory and index, and they meet only in the folder.
def test_a_shared_store_finds_and_forgets_what_another_wrote(stored, tmp_path):
    (a, inv_a), (b, inv_b), _ = stored.items()
    one, two = InversionStore(tmp_path, shared=True), InversionStore(tmp_path, shared=True)
    one.put(a, inv_a)
    assert a in two and two.ids() == []  # on disk, not indexed yet
    assert_same(two.get(a), inv_a)  # read from the file the other wrote
    assert two.ids() == [a]
    # a delete by one is seen by the other, although the other holds it in memory
    assert one.delete(a) is True
    assert two.get(a) is None and a not in two
    # and a delete by a store that never indexed the file removes it
    two.put(b, inv_b)
    assert one.delete(b) is True
    assert not (tmp_path / f"{b}.safetensors").exists() and two.get(b) is None
    # an unshared store keeps to its own index (the default: one process owns the root)
    solo = InversionStore(tmp_path)
    one.put(a, inv_a)
    assert solo.get(a) is None


def test_a_shared_store_starting_keeps_young_partial_files(stored, tmp_path):
    young, old = tmp_path / f"{PARTIAL_PREFIXES[0]}young.tmp", tmp_path / f"{PARTIAL_PREFIXES[0]}old.tmp"
    young.write_bytes(b"another process is writing this")
    old.write_bytes(b"a write that never finished")
    long_ago = os.path.getmtime(old) - 2 * store_module.SHARED_PARTIAL_AGE_S
    os.utime(old, (long_ago, long_ago))
    InversionStore(tmp_path, shared=True)
    assert young.exists() and not old.exists()
    InversionStore(tmp_path)  # an unshared store owns the root: it removes every partial file
    assert not young.exists()


def test_a_shared_store_caps_every_process_files(stored, file_size, tmp_path):
    """The cap covers the folder, not only what one store wrote: the least recently used
    file goes, whoever wrote it, and the other store stops serving it from memory."""
    (a, inv_a), (b, inv_b), (c, inv_c) = stored.items()
    cap = file_size[a] + file_size[b] + file_size[c] - 1
    one, two = (
        InversionStore(tmp_path, disk_bytes=cap, shared=True),
        InversionStore(tmp_path, disk_bytes=cap, shared=True),
    )
    one.put(a, inv_a)
    two.put(b, inv_b)
    assert one.get(a) is not None  # a is now more recent than b
    one.put(c, inv_c)  # three files pass the cap: b, the least recently used, goes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.safetensors" for k in (a, c))
    assert two.get(b) is None  # two held b in memory, but its file is gone
    assert one.stats()["disk_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir()) <= cap


def test_shared_stores_in_threads(stored, file_size, tmp_path):
    """Four stores on one root, two threads each, putting, getting and deleting: no
    exception, every get returns nothing or exactly what was put, no partial file is left."""
    keys = list(stored)
    stores = [InversionStore(tmp_path, memory_items=1, shared=True) for _ in range(4)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        rng = random.Random(n)
        store = stores[n % len(stores)]
        try:
            for _ in range(30):
                key = rng.choice(keys)
                action = rng.random()
                if action < 0.4:
                    store.put(key, stored[key])
                elif action < 0.95:
                    got = store.get(key)
                    if got is not None:
                        assert_same(got, stored[key])
                else:
                    store.delete(key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = [p.name for p in tmp_path.iterdir()]
    assert not any(name.startswith(PARTIAL_PREFIXES) for name in names)
    fresh = InversionStore(tmp_path, shared=True)
    for key in fresh.ids():
        assert_same(fresh.get(key), stored[key])
