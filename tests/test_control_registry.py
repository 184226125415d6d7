"""The controller names of the command line, the benchmarks and the API all come from
:mod:`pyinv.control.registry`, and the layers import downwards only (no benchmark module
imports the command line)."""

from __future__ import annotations

import argparse
import ast
import pathlib
from types import SimpleNamespace

import pytest

import pyinv
from pyinv import PyinvError
from pyinv.api import _controller
from pyinv.bench import pie_bench, shapes_bench, speed
from pyinv.cli import build_parser
from pyinv.cli import control as cli_control
from pyinv.control import CONTROLS, P2P, LocalBlend
from pyinv.control.registry import (
    CONTROL_NAMES,
    KINDS,
    NONE,
    benchmark_controller,
    build_controller,
    choices,
    get_control,
)

PACKAGE = pathlib.Path(pyinv.__file__).parent


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _choices(parser: argparse.ArgumentParser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings).choices


@pytest.mark.parametrize("command", [("edit",), ("benchmark",), ("eval", "shapes"), ("eval", "pie-bench")])
def test_cli_control_choices_are_the_registry(command):
    assert tuple(_choices(_subparser(build_parser(), *command), "--control")) == CONTROL_NAMES


def test_cli_control_flags_belong_to_registered_controls():
    owners = {owner for _, owner in cli_control.KNOBS.values()}
    assert owners <= set(CONTROL_NAMES) - {NONE}
    assert set(cli_control.SETTINGS) | set(cli_control.FLAG_HINTS) <= set(CONTROL_NAMES)
    listed = [line.split()[0] for line in cli_control.control_epilog().splitlines()[1:] if line[2:3].strip()]
    assert tuple(listed) == CONTROL_NAMES


@pytest.mark.parametrize("name", CONTROL_NAMES)
def test_benchmarks_and_api_build_the_registry_controllers(name):
    kind = KINDS[name]
    case = shapes_bench.make_cases(1, ["color"])[0]
    built = [
        speed.controller(name, compiled=False),
        speed.controller(name, compiled=True),
        shapes_bench.controller_for(name, case),
        pie_bench.controller_for(name, SimpleNamespace(words=("cat", "dog"))),
        pie_bench.controller_for(name, SimpleNamespace(words=None)),
        _controller(name),
        _controller(f" {name.upper()} "),
        build_controller(name),
    ]
    if kind.is_prompt_swap:
        assert built == [None] * len(built)
        return
    assert all(type(c) is kind.cls for c in built)
    assert [c.graph_static for c in built[:2]] == [False, True]
    assert CONTROLS[name] is kind.cls


@pytest.mark.parametrize("name", CONTROL_NAMES)
def test_benchmark_matrices_accept_the_registry_names(name):
    assert [c.control for c in speed.matrix(["direct"], [name], baseline=False)] == [name]
    assert [c.control for c in shapes_bench.matrix(["direct"], [name])] == [name]
    assert [c.control for c in pie_bench.matrix(["direct"], [name])] == [name]


def test_default_matrices_use_registered_names():
    configs = [*speed.matrix(), *speed.matrix(quick=True), *shapes_bench.matrix(), *pie_bench.matrix()]
    assert {c.control for c in configs} <= set(CONTROL_NAMES)
    assert {c.control for c in shapes_bench.default_matrix()} == set(CONTROL_NAMES)


def test_unknown_names_list_the_registry_choices():
    for call in (
        lambda: get_control("p2q"),
        lambda: speed.matrix(["direct"], ["p2q"]),
        lambda: shapes_bench.matrix(["direct"], ["p2q"]),
        lambda: pie_bench.controller_for("p2q", SimpleNamespace(words=None)),
        lambda: _controller("p2q"),
    ):
        with pytest.raises(PyinvError, match=f"use one of {choices()}"):
            call()
    assert choices() == ", ".join(CONTROL_NAMES) == "none, p2p, masactrl, pnp"


def test_benchmark_settings_are_pie_bench_p2p():
    """P2P in the benchmarks is :meth:`P2P.pie_bench` on the edited words; MasaCtrl and PnP
    keep their defaults."""
    p2p = benchmark_controller("p2p", ("red", "green"), graph_static=True)
    reference = P2P.pie_bench("red", "green", graph_static=True)
    assert (p2p.edit, p2p.cross_replace, p2p.self_replace, p2p.reweight) == (
        reference.edit,
        reference.cross_replace,
        reference.self_replace,
        reference.reweight,
    )
    assert isinstance(p2p.blend, LocalBlend) and p2p.graph_static
    plain = benchmark_controller("p2p")
    assert plain.blend is None and plain.reweight == {} and (plain.cross_replace, plain.self_replace) == (0.4, 0.6)
    assert repr(benchmark_controller("masactrl")) == repr(build_controller("masactrl"))
    assert repr(benchmark_controller("pnp")) == repr(build_controller("pnp"))


def test_prompt_swap_takes_no_settings():
    with pytest.raises(PyinvError, match="takes no settings"):
        build_controller(NONE, edit="refine")


def _imported_modules(path: pathlib.Path, text: str | None = None) -> set[str]:
    """The absolute names of the modules the file ``path`` of the package imports (relative
    imports resolved; ``text``: read this source instead of the file's)."""
    package = ["pyinv", *path.relative_to(PACKAGE).parent.parts]
    source = path.read_text(encoding="utf-8") if text is None else text
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _cli_imports(names: set[str]) -> set[str]:
    return {m for m in names if m == "pyinv.cli" or m.startswith("pyinv.cli.")}


@pytest.mark.parametrize(
    "path",
    [*sorted((PACKAGE / "bench").glob("*.py")), PACKAGE / "provenance.py", *sorted((PACKAGE / "control").glob("*.py"))],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_lower_layers_do_not_import_the_cli(path):
    imported = _imported_modules(path)
    assert not _cli_imports(imported)
    if path.parent.name == "control" or path.name == "provenance.py":
        assert not {m for m in imported if m.startswith("pyinv.bench")}


def test_the_import_check_sees_relative_imports_of_the_cli():
    report = PACKAGE / "bench" / "report.py"
    names = _imported_modules(report, "from ..cli import environment\nfrom . import metrics\nimport pyinv.cli.common\n")
    assert _cli_imports(names) == {"pyinv.cli", "pyinv.cli.environment", "pyinv.cli.common"}
    assert "pyinv.bench.metrics" in names
