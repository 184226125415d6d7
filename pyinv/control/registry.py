"""The attention controllers by name, for the command line, the benchmarks and the API.

Each name in :data:`CONTROL_NAMES` maps to a :class:`ControlKind`: the controller's class,
a one-line summary and two ways to build it:

- :meth:`ControlKind.build` (:func:`build_controller`): the controller with its defaults,
  overridden by keyword settings of its constructor. ``Editor.edit(control="p2p")`` builds
  ``build_controller("p2p")``; ``pyinv edit --control`` passes the settings of its flags.
- :meth:`ControlKind.benchmark` (:func:`benchmark_controller`): the benchmarks' settings.
  P2P in PIE-Bench's configuration (:meth:`P2P.pie_bench`) on the edited words, MasaCtrl
  and PnP at their defaults; ``graph_static=True`` for a compiled UNet (one graph for
  every step).

``"none"`` is a prompt swap: the targets are sampled with their prompts and nothing else.
Its class is :class:`NoControl`, and it builds as ``None``, the value ``Editor.edit`` and
the inversion methods take for "no controller".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PyinvError
from .base import Controller, NoControl
from .masactrl import MasaCtrl
from .p2p import P2P
from .pnp import PnP

#: the name of the prompt swap (no attention control)
NONE = "none"
#: the controller used when none is chosen, for methods that take attention control
DEFAULT_CONTROL = "p2p"

#: the benchmarks' builder of a controller: ``(words, graph_static) -> controller``
BenchmarkBuilder = Callable[[Sequence[str] | None, bool | None], Controller]


@dataclass(frozen=True)
class ControlKind:
    """One controller by name: its class, a summary, and its benchmark settings.

    ``benchmark_builder`` builds the benchmarks' configuration from the edited words
    ``(source_word, target_word)`` (or ``None``) and ``graph_static``; without one the
    benchmarks use the class's defaults with ``graph_static``.
    """

    name: str
    cls: type[Controller]
    summary: str
    benchmark_builder: BenchmarkBuilder | None = None

    @property
    def is_prompt_swap(self) -> bool:
        return self.cls is NoControl

    def build(self, **settings: Any) -> Controller | None:
        """The controller with its defaults overridden by ``settings`` (keyword arguments of
        its constructor); ``None`` for the prompt swap."""
        if self.is_prompt_swap:
            if settings:
                raise PyinvError(f"control {self.name!r} takes no settings, got {', '.join(settings)}")
            return None
        return self.cls(**settings)

    def benchmark(self, words: Sequence[str] | None = None, graph_static: bool | None = None) -> Controller | None:
        """The controller in the benchmarks' settings for an edit of ``words`` (the source
        and the target word, or ``None``); ``None`` for the prompt swap."""
        if self.is_prompt_swap:
            return None
        if self.benchmark_builder is not None:
            return self.benchmark_builder(words, graph_static)
        return self.cls(graph_static=graph_static)


def _p2p_benchmark(words: Sequence[str] | None, graph_static: bool | None) -> Controller:
    """P2P as PIE-Bench runs it: refine, LocalBlend and ×2 reweighting on the edited words
    (without words: the same windows only)."""
    return P2P.pie_bench(*(words or ()), graph_static=graph_static)


#: every controller by name, in the order the command line lists them
KINDS: dict[str, ControlKind] = {
    kind.name: kind
    for kind in (
        ControlKind(NONE, NoControl, "prompt swap: the target is sampled with its prompt, nothing else"),
        ControlKind("p2p", P2P, "Prompt-to-Prompt", _p2p_benchmark),
        ControlKind("masactrl", MasaCtrl, "mutual self-attention"),
        ControlKind("pnp", PnP, "Plug-and-Play"),
    )
}

#: the accepted control names
CONTROL_NAMES: tuple[str, ...] = tuple(KINDS)


def choices() -> str:
    """The accepted names as a message lists them: ``"none, p2p, masactrl, pnp"``."""
    return ", ".join(CONTROL_NAMES)


def get_control(name: str) -> ControlKind:
    """The :class:`ControlKind` called ``name``; an unknown name is an error listing the choices."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise PyinvError(f"unknown control {name!r}; use one of {choices()}")
    return kind


def build_controller(name: str, **settings: Any) -> Controller | None:
    """``name``'s controller with its defaults overridden by ``settings`` (``None`` for ``"none"``)."""
    return get_control(name).build(**settings)


def benchmark_controller(
    name: str, words: Sequence[str] | None = None, graph_static: bool | None = None
) -> Controller | None:
    """``name``'s controller in the benchmarks' settings (see :meth:`ControlKind.benchmark`)."""
    return get_control(name).benchmark(words, graph_static)
