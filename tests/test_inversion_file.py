"""An inversion file is untrusted input: every tampered field is one clear error, no output.

A good file is made once (tiny model, 2 steps); each case rewrites its metadata or tensors
with safetensors and checks the API (:meth:`Inversion.load`, :meth:`Editor.edit`) raises a
:class:`PyinvError` and the CLI (``pyinv edit --inversion``) prints one line and writes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_test_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from pyinv import PyinvError, cli
from pyinv.inversion import Inversion

pytestmark = pytest.mark.usefixtures("tiny_cli_default")

Meta = dict
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def good_files(editor, tmp_path_factory) -> dict[str, str]:
    """Direct (pinned) and null-text inversions of the test image, 2 steps each."""
    folder = tmp_path_factory.mktemp("inversions")
    image = make_test_image()
    files = {}
    for method, options in (("direct", {}), ("null-text", {"inner_steps": 1})):
        inv = editor.invert(image, "a photo of a red ball", method=method, steps=2, **options)
        files[method] = str(folder / f"{method}.safetensors")
        inv.save(files[method])
    return files


def _read(path: str) -> tuple[Meta, Tensors]:
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["pyinv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def _rewrite(source: str, target: Path, change: Callable[[Meta, Tensors], None]) -> str:
    meta, tensors = _read(source)
    change(meta, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata={"pyinv": json.dumps(meta)})
    return str(target)


def _set(key: str, value) -> Callable[[Meta, Tensors], None]:
    return lambda meta, tensors: meta.__setitem__(key, value)


def _tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Meta, Tensors], None]:
    return lambda meta, tensors: tensors.__setitem__(name, make(tensors[name]))


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


def _schedule_steps(n: int) -> Callable[[Meta, Tensors], None]:
    def change(meta, tensors):
        meta["num_steps"] = n

    return change


def _timesteps(values) -> Callable[[Meta, Tensors], None]:
    return lambda meta, tensors: meta["schedule"].__setitem__("timesteps", values)


def _option(key, value) -> Callable[[Meta, Tensors], None]:
    return lambda meta, tensors: meta["options"].__setitem__(key, value)


def _fingerprint(sample) -> Callable[[Meta, Tensors], None]:
    return lambda meta, tensors: meta["model"].__setitem__("weight_sample", sample)


def _as_null_text(meta, tensors):
    meta["method"], meta["options"] = "null-text", {}


def _extra_tensor(meta, tensors):
    tensors["payload"] = torch.zeros(3)


#: case → (which good file, the tampering, a phrase the message must contain)
CASES = {
    "unknown method": ("direct", _set("method", "magic"), "unknown method 'magic'"),
    "method changed to one whose tensors are missing": ("direct", _as_null_text, "lacks the tensor(s) null_embeddings"),
    "num_steps past the schedule": ("direct", _schedule_steps(5000), "num_steps must be in [1, 1000]"),
    "num_steps zero": ("direct", _schedule_steps(0), "num_steps"),
    "num_steps not an integer": ("direct", _set("num_steps", 2.5), "num_steps"),
    "num_steps a string": ("direct", _set("num_steps", "2"), "num_steps"),
    "num_steps disagrees with the tensors": ("direct", _schedule_steps(1), "schedule does not hold 1 timesteps"),
    "timesteps past the training steps": ("direct", _timesteps([1500, 1]), "timesteps in [0, 1000)"),
    "timesteps not numbers": ("direct", _timesteps(["a", "b"]), "timesteps"),
    "guidance not finite": ("direct", _set("guidance", float("inf")), "guidance"),
    "guidance huge": ("direct", _set("guidance", 1e20), "guidance"),
    "guidance a string": ("direct", _set("guidance", "7.5"), "guidance"),
    "method a number": ("direct", _set("method", 3), "method"),
    "source prompt not text": ("direct", _set("source_prompt", ["a"]), "source_prompt"),
    "unknown option": ("direct", _option("strength", 2), "no option(s) strength"),
    "z0 of another width": ("direct", _tensor("z0", lambda t: t[..., :4]), "tensor z0 has shape"),
    "trajectory too short": ("direct", _tensor("trajectory", lambda t: t[:2]), "tensor trajectory has shape"),
    "trajectory of other channels": ("direct", _tensor("trajectory", lambda t: t[:, :3]), "trajectory"),
    "trajectory with NaN": ("direct", _tensor("trajectory", _with_nan), "non-finite"),
    "z0 with inf": ("direct", _tensor("z0", _with_inf), "non-finite"),
    "integer tensor": ("direct", _tensor("z0", lambda t: t.to(torch.int32)), "floating-point"),
    "embeddings of another width": ("null-text", _tensor("null_embeddings", lambda t: t[..., :16]), "width is 16"),
    "embeddings with NaN": ("null-text", _tensor("null_embeddings", _with_nan), "non-finite"),
    "unknown tensor": ("direct", _extra_tensor, "unknown tensor 'payload'"),
    "embeddings of two dimensions": ("null-text", _tensor("null_embeddings", lambda t: t[0]), "null_embeddings"),
    "fingerprint not numbers": ("direct", _fingerprint(["a"] * 16), "made with model"),
    "fingerprint of another length": ("direct", _fingerprint([0.0]), "made with model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_inversion_file_is_refused(case, good_files, editor, tmp_path, capsys):
    which, change, phrase = CASES[case]
    path = _rewrite(good_files[which], tmp_path / "bad.safetensors", change)
    with pytest.raises(PyinvError, match=None) as api_error:
        editor.load_inversion(path)
    assert phrase in str(api_error.value)
    out = tmp_path / "out.png"
    status = cli.main(["edit", "--inversion", path, "--target", "a photo of a blue cube", "--out", str(out), "-q"])
    _, err = capsys.readouterr()
    assert status == 1 and err.count("\n") == 1 and err.startswith("pyinv: error: ") and phrase in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def _other_model_shapes(meta, tensors):
    """Internally consistent, but for a model with 8×8 latents (the fingerprint is left alone)."""
    for name in ("z0", "trajectory"):
        tensors[name] = tensors[name][..., :8, :8].contiguous()


def test_shapes_that_do_not_fit_the_model(good_files, editor, tmp_path, capsys):
    path = _rewrite(good_files["direct"], tmp_path / "bad.safetensors", _other_model_shapes)
    Inversion.load(path)  # consistent on its own
    with pytest.raises(PyinvError, match="does not fit model 'tiny': its latent size is 8, not 16"):
        editor.load_inversion(path)
    out = tmp_path / "out.png"
    status = cli.main(["edit", "--inversion", path, "--target", "a blue cube", "--out", str(out), "-q"])
    _, err = capsys.readouterr()
    assert status == 1 and err.count("\n") == 1 and "does not fit model" in err
    assert not out.exists()


def test_in_memory_inversion_is_checked_too(good_files, editor):
    inv = Inversion.load(good_files["direct"])
    inv.tensors["trajectory"] = _with_nan(inv.tensors["trajectory"])
    with pytest.raises(PyinvError, match="non-finite"):
        editor.edit(inv, "a blue cube")


@pytest.mark.parametrize("value", [123, None, b"x.safetensors"])
def test_inversion_of_a_wrong_kind(editor, value):
    with pytest.raises(PyinvError, match="Inversion or the path"):
        editor.edit(value, "a blue cube")


def test_good_files_still_edit(good_files, editor):
    for path in good_files.values():
        assert editor.edit(path, "a photo of a blue cube").images[0].size == (32, 32)


# ---------------------------------------------------------------------- fuzzing the metadata
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [
    ("method",), ("model",), ("source_prompt",), ("num_steps",), ("guidance",), ("schedule",), ("image_size",),
    ("options",), ("stats",), ("model", "weight_sample"), ("model", "config_sha256"), ("schedule", "timesteps"),
    ("schedule", "config"), ("schedule", "mode"), ("options", "form"),
]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON, drop=st.booleans())
def test_any_metadata_change_edits_or_fails_cleanly(good_files, editor, tmp_path, field, value, drop):
    """Whatever a field is changed to (or if it is dropped), loading for the model and editing
    either succeed or raise a PyinvError: never another exception."""

    def change(meta, tensors):
        parent = meta
        for key in field[:-1]:
            parent = parent[key]
        if drop:
            parent.pop(field[-1], None)
        else:
            parent[field[-1]] = value

    path = _rewrite(good_files["direct"], tmp_path / "fuzz.safetensors", change)
    try:
        editor.edit(editor.load_inversion(path), "a blue cube")
    except PyinvError:
        pass
    finally:
        os.remove(path)
