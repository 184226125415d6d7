"""Method options: one frozen dataclass per method and kind, and their descriptions.

Each method declares what it takes at inversion time and at edit time as two dataclasses
(``Method.invert_options_type``, ``Method.edit_options_type``); they are the one place an
option's default, help text and command-line flag are written::

    @dataclass(frozen=True)
    class DirectOptions(MethodOptions):
        form: str = option("pinned", "pin the source branch or use offsets", flag="--form", choices=FORMS)

        def __post_init__(self):
            if self.form not in FORMS:
                raise PyinvError(...)

``__post_init__`` checks what can be checked from the values alone (a :class:`PyinvError`
names the option) and may normalise them (``object.__setattr__``, the classes are frozen);
what depends on the model or the inversion (EF-DDPM's ``skip`` against the step count) is
checked where that is known. Inversion options are recorded in the inversion
(:meth:`MethodOptions.to_record`, the file's ``"options"``); edit options are not.

From the registered methods' dataclasses, :func:`option_fields` describes every option
(:class:`OptionField`: name, kind, default, help, flag, parser, which methods take it), and
the command line generates its method flags, their help and ``pyinv methods`` from that
(:func:`add_arguments`, :func:`given_options`, :func:`method_flags`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import PyinvError
from .registry import METHODS

#: when an option is given: to ``invert`` (recorded in the inversion) or to ``edit``
KINDS = ("invert", "edit")
#: how messages name each kind ("method 'ddim' has no inversion option(s) …")
KIND_WORDS = {"invert": "inversion", "edit": "edit"}

Options = TypeVar("Options", bound="MethodOptions")


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
) -> Any:
    """A field of an options dataclass.

    Args:
        default: the option's default (an immutable value).
        help: what it does, without the method names or the default (both are added).
        flag: its command-line flag (``None``: the Python API only).
        parse: the argparse type turning the flag's text into a value (``None``: the text).
        choices: the values the flag accepts (``None``: any ``parse`` accepts).
        metavar: the flag's value placeholder in the help.
        default_text: how the default reads where the value does not say it (``None`` for
            "36 of 100 steps, scaled to the step count").
    """
    meta = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "choices": choices,
        "metavar": metavar,
        "default_text": default_text,
    }
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class MethodOptions:
    """Base of the options dataclasses (see the module docstring)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name → default, in declaration order."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def of(cls: type[Options], values: Mapping[str, Any] | MethodOptions, method: str, kind: str) -> Options:
        """The options ``values`` give (the rest at their defaults), checked: an unknown name
        or a bad value is a :class:`PyinvError`."""
        if isinstance(values, cls):
            return values
        unknown = set(values) - set(cls.defaults())
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise PyinvError(f"method {method!r} has no {KIND_WORDS[kind]} option(s) {names}")
        return cls(**values)

    def to_record(self) -> dict[str, Any]:
        """Option name → value, as an inversion records them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method that takes no options (of one kind)."""


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class OptionField:
    """One option of the registered methods, as the command line shows it.

    Attributes:
        name: the keyword of ``Editor.invert`` / ``Editor.edit`` (and the key recorded in an
            inversion's options, for ``kind="invert"``).
        kind: ``"invert"`` or ``"edit"``.
        default: the dataclass default.
        help: what it does (without the method names or the default).
        methods: the registered methods that take it, in registry order.
        flag / parse / choices / metavar: its command-line flag (``flag=None``: none) and
            how the flag's value is read.
        default_text: how the default reads where ``default`` does not say it.
    """

    name: str
    kind: str
    default: Any
    help: str
    methods: tuple[str, ...]
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None

    @property
    def shown_default(self) -> str:
        """The default as the help writes it (``default_text``, else the value)."""
        return self.default_text if self.default_text is not None else _shown(self.default)

    @property
    def flag_help(self) -> str:
        """The flag's help: ``"null-text / prompt-tuning: optimisation steps per timestep (default 10)"``."""
        return f"{' / '.join(self.methods)}: {self.help} (default {self.shown_default})"

    def summary(self) -> str:
        """One line for ``pyinv methods``: ``"eta (edit, --eta): weight of … (default 0.8)"``."""
        where = ", ".join(part for part in (KIND_WORDS[self.kind], self.flag) if part)
        return f"{self.name} ({where}): {self.help} (default {self.shown_default})"

    def argument(self) -> dict[str, Any]:
        """Keyword arguments of ``argparse``'s ``add_argument(flag, **…)``: the value is
        ``None`` unless the flag is given, so the method's default applies."""
        return {
            "dest": self.name,
            "type": self.parse,
            "choices": self.choices,
            "metavar": self.metavar,
            "help": self.flag_help.replace("%", "%%"),
        }


_SAME = ("default", "help", "flag", "parse", "choices", "metavar", "default_text")


def describe(methods: Iterable, kind: str | None = None) -> list[OptionField]:
    """Every option of ``methods`` (of one ``kind``, or invert then edit), in order of first
    appearance. An option several methods take (``inner_steps``) is one entry listing them
    all; they must declare it alike, and two options may not share a flag."""
    methods = list(methods)
    found: dict[tuple[str, str], OptionField] = {}
    for k in KINDS if kind is None else (kind,):
        for method in methods:
            for f in dataclasses.fields(method.options_type(k)):
                meta = dict(f.metadata)
                entry = OptionField(
                    name=f.name,
                    kind=k,
                    default=f.default,
                    help=meta.get("help", ""),
                    methods=(method.name,),
                    flag=meta.get("flag"),
                    parse=meta.get("parse"),
                    choices=meta.get("choices"),
                    metavar=meta.get("metavar"),
                    default_text=meta.get("default_text"),
                )
                seen = found.get((k, f.name))
                if seen is None:
                    found[(k, f.name)] = entry
                    continue
                differ = [a for a in _SAME if getattr(seen, a) != getattr(entry, a)]
                if differ:
                    raise TypeError(
                        f"{k} option {f.name!r} of {method.name!r} differs from {seen.methods[0]!r}'s "
                        f"in its {', '.join(differ)}"
                    )
                found[(k, f.name)] = dataclasses.replace(seen, methods=(*seen.methods, method.name))
    flags: dict[str, str] = {}
    for entry in found.values():
        if entry.flag is None:
            continue
        other = flags.setdefault(entry.flag, entry.name)
        if other != entry.name:
            raise TypeError(f"options {other!r} and {entry.name!r} share the flag {entry.flag}")
    return list(found.values())


def option_fields(kind: str | None = None) -> list[OptionField]:
    """:func:`describe` of the registered methods."""
    return describe(METHODS.values(), kind)


def fields_of(method, kind: str | None = None) -> list[OptionField]:
    """The options ``method`` takes (of one ``kind``, or invert then edit)."""
    return [f for f in option_fields(kind) if method.name in f.methods]


def cli_flags(kind: str) -> dict[str, str]:
    """Option name → flag of the options of ``kind`` that have one."""
    return {f.name: f.flag for f in option_fields(kind) if f.flag is not None}


def method_flags(method) -> list[str]:
    """The flags of ``method``'s options: inversion options first, then edit options."""
    return [f.flag for f in fields_of(method) if f.flag is not None]


def methods_with(name: str, kind: str) -> str:
    """The registered methods that take option ``name`` of ``kind``, for messages."""
    names = [m.name for m in METHODS.values() if name in m.options_type(kind).defaults()]
    return ", ".join(names) or "no registered method"


def add_arguments(group, kind: str) -> None:
    """Add a flag per option of ``kind`` that has one to an argparse parser or group."""
    for f in option_fields(kind):
        if f.flag is not None:
            group.add_argument(f.flag, **f.argument())


def given_options(values: Mapping[str, Any], method, kind: str) -> dict[str, Any]:
    """The options of ``kind`` given on the command line (``values``: the parsed arguments,
    ``None`` where a flag is absent) as keywords for ``method``; a flag of an option
    ``method`` does not take is a :class:`PyinvError` naming the methods that do."""
    accepted = method.options_type(kind).defaults()
    options = {}
    for name, flag in cli_flags(kind).items():
        value = values.get(name)
        if value is None:
            continue
        if name not in accepted:
            raise PyinvError(
                f"{flag} does not apply to method {method.name!r} (it applies to: {methods_with(name, kind)})"
            )
        options[name] = value
    return options


class OptionDefaults:
    """``Method.invert_options`` / ``Method.edit_options``: option name → default, read
    from the method's options dataclass of that kind (a fresh dict on every access)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __get__(self, obj: Any, owner: type) -> dict[str, Any]:
        return owner.options_type(self.kind).defaults()  # type: ignore[attr-defined]
