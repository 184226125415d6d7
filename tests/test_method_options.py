"""Method options: one dataclass per method and kind is the one source of every default.

The API's defaults, the recorded options, the command line's flags, their help and
``pyinv methods`` all come from those dataclasses; and the layering around them (the
record, the models and presets modules) imports nothing from above.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from conftest import make_test_image

import pyinv
from pyinv import PyinvError, cli
from pyinv.inversion import METHODS, Inversion, get_method, option_fields
from pyinv.inversion.edit_friendly import default_skip
from pyinv.inversion.options import KINDS, MethodOptions, NoOptions, describe, option

pytestmark = pytest.mark.usefixtures("tiny_cli_default")

SRC, TGT = "a photo of a red ball", "a photo of a blue cube"
ROOT = Path(pyinv.__file__).parent


def _fields(method, kind):
    return dataclasses.fields(method.options_type(kind))


def _flat(text: str) -> str:
    """``text`` without whitespace: argparse wraps help lines wherever it likes."""
    return "".join(text.split())


# ---------------------------------------------------------------------- one source of defaults
@pytest.mark.parametrize("name", list(METHODS))
def test_the_api_defaults_are_the_dataclass_defaults(name):
    method = METHODS[name]
    for kind, defaults in (("invert", method.invert_options), ("edit", method.edit_options)):
        assert defaults == {f.name: f.default for f in _fields(method, kind)}
        assert defaults == method.options_type(kind)().to_record()
    # no default is repeated in a signature: options arrive as keywords and become the dataclass
    for hook in ("invert", "edit", "_invert", "_edit", "program"):
        params = inspect.signature(getattr(type(method), hook)).parameters.values()
        assert all(p.default is p.empty for p in params), hook


def test_every_option_is_described_once_with_its_dataclass_default():
    described = {(f.kind, f.name): f for f in option_fields()}
    for method in METHODS.values():
        for kind in KINDS:
            for f in _fields(method, kind):
                entry = described[(kind, f.name)]
                assert entry.default == f.default and method.name in entry.methods
                assert entry.help and entry.help == f.metadata["help"]
    assert len(described) == len(option_fields())
    assert {f.flag for f in option_fields() if f.flag} == {"--form", "--inner-steps", "--eta", "--skip"}


def test_inversions_record_the_dataclass_defaults(editor):
    image = make_test_image()
    for name in ("ddim", "direct", "edict", "edit-friendly"):
        method = get_method(name)
        inv = editor.invert(image, SRC, method=name, steps=2)
        assert inv.options == method.invert_options_type().to_record() == method.invert_options
    inv = editor.invert(image, SRC, method="null-text", steps=2)
    assert inv.options == {"inner_steps": 10, "epsilon": 1e-5} == get_method("null-text").invert_options
    inv = editor.invert(image, SRC, method="prompt-tuning", steps=2, inner_steps=1)
    assert inv.options == {"inner_steps": 1, "epsilon": 1e-5, "init_prompt": SRC}  # the text it started from


def test_edits_without_an_option_use_the_dataclass_default(editor):
    image = make_test_image()
    pti = editor.invert(image, SRC, method="prompt-tuning", steps=2, inner_steps=1)
    eta = get_method("prompt-tuning").edit_options["eta"]
    assert eta == 0.8
    assert editor.edit(pti, TGT).latents.equal(editor.edit(pti, TGT, eta=eta).latents)
    ef = editor.invert(image, SRC, method="edit-friendly", steps=5, seed=1)
    assert get_method("edit-friendly").edit_options == {"skip": None, "shift": 0, "color": None}
    assert editor.edit(ef, TGT, seed=2).latents.equal(editor.edit(ef, TGT, seed=2, skip=default_skip(5)).latents)


# ---------------------------------------------------------------------- the generated command line
def test_every_default_appears_in_pyinv_methods(capsys):
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out.split("\n\n")[0]
    lines: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if not line[0].isspace():
            name = line.split()[0]
        lines.setdefault(name, []).append(line.strip())
    for method in METHODS.values():
        for kind in KINDS:
            for f in _fields(method, kind):
                if f.metadata["default_text"] is not None:
                    shown = f.metadata["default_text"]
                elif isinstance(f.default, float):
                    shown = f"{f.default:g}"
                else:
                    shown = "none" if f.default is None else str(f.default)
                entry = next(e for e in option_fields(kind) if e.name == f.name)
                assert entry.shown_default == shown
                line = next(x for x in lines[method.name] if x.startswith(f"{f.name} ("))
                assert line.endswith(f"(default {shown})"), line
                assert (f.metadata["flag"] or "") in line


@pytest.mark.parametrize("command, kinds", [("edit", KINDS), ("invert", ("invert",))])
def test_every_flag_and_its_default_appear_in_the_help(command, kinds, capsys):
    assert cli.main([command, "--help"]) == 0
    out = _flat(capsys.readouterr().out)
    for kind in kinds:
        for entry in option_fields(kind):
            if entry.flag is None:
                assert entry.flag_help not in out
                continue
            assert entry.flag in out
            assert _flat(f"{' / '.join(entry.methods)}: {entry.help} (default {entry.shown_default})") in out
    assert _flat("null-text / prompt-tuning: optimisation steps per timestep (default 10)") in out
    assert (_flat("--eta") in out) == (command == "edit")


def test_a_flag_of_another_method_names_the_methods_that_take_it(images_dir, capsys):
    status = cli.main(["edit", images_dir, "--source", SRC, "--target", TGT, "--inner-steps", "3", "--out", "o.png"])
    err = capsys.readouterr().err
    assert status == 1
    assert "--inner-steps does not apply to method 'direct' (it applies to: null-text, prompt-tuning)" in err


@pytest.mark.parametrize("flag, value", [("--form", "offsets"), ("--inner-steps", "2"), ("--steps", "3")])
def test_inversion_flags_are_refused_with_an_inversion_file(flag, value, tmp_path, capsys):
    argv = ["edit", "--inversion", str(tmp_path / "x.safetensors"), "--target", TGT, "--out", str(tmp_path / "o.png")]
    assert cli.main([*argv, flag, value]) == 2
    assert f"{flag} cannot be used with --inversion" in capsys.readouterr().err


@pytest.fixture
def images_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_test_image().save(tmp_path / "in.png")
    return str(tmp_path / "in.png")


# ---------------------------------------------------------------------- the options' checks
@pytest.mark.parametrize(
    "method, kind, values, message",
    [
        ("direct", "invert", {"form": "sideways"}, "unknown Direct Inversion form 'sideways'"),
        ("null-text", "invert", {"inner_steps": 0}, "inner_steps must be an integer in \\[1, 1000\\]"),
        ("null-text", "invert", {"epsilon": -1}, "epsilon must be a finite number"),
        ("prompt-tuning", "invert", {"init_prompt": 3}, "init_prompt must be a string"),
        ("prompt-tuning", "edit", {"eta": 2}, "prompt-tuning eta must be in \\[0, 1\\]"),
        ("edit-friendly", "edit", {"shift": "left"}, "shift must be an int"),
        ("edit-friendly", "edit", {"color": 3}, "color must be a dict"),
        ("edict", "invert", {"leapfrog": 1}, "leapfrog must be True or False"),
        ("ddim", "invert", {"form": "pinned"}, "method 'ddim' has no inversion option\\(s\\) form"),
        ("ddim", "edit", {"eta": 0.5, "skip": 1}, "method 'ddim' has no edit option\\(s\\) eta, skip"),
    ],
)
def test_options_are_checked_by_their_dataclass(method, kind, values, message):
    algo = get_method(method)
    with pytest.raises(PyinvError, match=message):
        algo.options_type(kind).of(values, algo.name, kind)


def test_options_are_normalised():
    assert get_method("null-text").invert_options_of({"epsilon": 0}).epsilon == 0.0
    assert isinstance(get_method("edict").invert_options_of({"mixing": 1 / 2}).mixing, float)
    color = get_method("edit-friendly").edit_options_of({"color": {"mask": 1, "target": 2}}).color
    assert (color.mask, color.target, color.strength) == (1, 2, 1.0)  # shapes are checked at the edit


def test_a_recorded_option_of_a_bad_value_is_refused(editor):
    inv = editor.invert(make_test_image(), SRC, method="direct", steps=2)
    bad = Inversion(**{**inv.__dict__, "options": {"form": "sideways"}})
    with pytest.raises(PyinvError, match="inversion: unknown Direct Inversion form 'sideways'"):
        bad.check_tensors()
    with pytest.raises(PyinvError, match="unknown Direct Inversion form"):
        editor.edit(bad, TGT)


@pytest.mark.parametrize("method, tensor", [("edict", "edict_y"), ("edit-friendly", "noise_maps")])
def test_every_method_names_the_tensors_its_edit_reads(editor, method, tensor):
    inv = editor.invert(make_test_image(), SRC, method=method, steps=2)
    inv.check_tensors()
    lacking = Inversion(**{**inv.__dict__, "tensors": {k: v for k, v in inv.tensors.items() if k != tensor}})
    with pytest.raises(PyinvError, match=f"lacks the tensor\\(s\\) {tensor}"):
        editor.edit(lacking, TGT)


def test_options_declared_differently_or_sharing_a_flag_are_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class A(MethodOptions):
        k: int = option(1, "steps", flag="--k")

    @dataclasses.dataclass(frozen=True)
    class B(MethodOptions):
        k: int = option(2, "steps", flag="--k")

    @dataclasses.dataclass(frozen=True)
    class C(MethodOptions):
        j: int = option(1, "other", flag="--k")

    def method(name, options):
        return type(name, (pyinv.inversion.Method,), {"name": name, "invert_options_type": options})()

    assert [f.methods for f in describe([method("a", A), method("a2", A)], "invert")] == [("a", "a2")]
    with pytest.raises(TypeError, match="differs .* in its default"):
        describe([method("a", A), method("b", B)])
    with pytest.raises(TypeError, match="share the flag --k"):
        describe([method("a", A), method("c", C)])
    assert describe([method("n", NoOptions)]) == []


# ---------------------------------------------------------------------- layering
def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (lazy imports too), as written."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_models_and_presets_do_not_import_each_other():
    assert not {".models", "pyinv.models"} & _imports(ROOT / "presets.py")
    assert not {".models", "pyinv.models"} & _imports(ROOT / "diffusers_folder.py")
    assert not {".presets", "pyinv.presets"} & _imports(ROOT / "diffusers_folder.py")


def test_the_record_imports_nothing_above_it():
    imported = _imports(ROOT / "inversion" / "record.py")
    assert not {".", "..models", "..api", ".base"} & imported
    assert not {name for name in imported if name.startswith(".") and not name.startswith("..")} - {".registry"}
    assert "..fingerprint" in imported


def test_the_record_takes_its_method_facts_from_the_caller(editor):
    """A caller that has the method's facts passes them; the record uses them, not the registry."""
    inv = editor.invert(make_test_image(), SRC, method="direct", steps=2)

    class Facts:
        invert_options = {"form": "pinned"}

        def recorded_options(self, inv):
            return inv.options

        def required_tensors(self, inv):
            return ("trajectory", "noise_maps")

    inv.check_tensors()  # the registered direct method needs the trajectory only
    with pytest.raises(PyinvError, match="lacks the tensor\\(s\\) noise_maps"):
        inv.check_tensors(method=Facts())
    with pytest.raises(PyinvError, match="lacks the tensor\\(s\\) noise_maps"):
        inv.check_model(editor.model, Facts())
