"""Typed option checking, with no compose imports: the bottom layer every other module builds on.

* the **type** of an option comes from its dataclass field's annotation (``bool`` must be a
  bool, not ``"no"``; ``int`` an int, not ``1.7`` or ``True``; ``float`` a finite number, not
  ``"1e-3"`` or ``nan``; ``Literal[...]`` one of its values; ``X | None``, ``list[X]``,
  ``tuple[X, Y]`` element by element);
* the **range** is declared next to the field, ``num_blocks: int = option(1, ge=1)`` (a
  :class:`Rule` in the field's metadata), or for classes this layer cannot annotate, in a
  table passed as ``rules=``.

Errors are :class:`OptionError` (a ``ValueError`` and a ``TypeError``) naming the option, the
value given and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OptionError",
    "Rule",
    "POSITIVE",
    "NON_NEGATIVE",
    "option",
    "rules_of",
    "check_value",
    "check_names",
    "validate_options",
    "validate_fields",
    "check_field",
    "fail",
]


class OptionError(ValueError, TypeError):
    """An option with a wrong name, type or value; the message names it and what is accepted."""


@dataclass(frozen=True)
class Rule:
    """Range of a number (``gt``/``ge``/``lt``/``le``), applied after the type check."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""
    """Extra advice appended to the error (e.g. "use None for no clipping")."""

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        return " and ".join(parts)

    def holds(self, x: float) -> bool:
        return not (
            (self.gt is not None and not x > self.gt)
            or (self.ge is not None and not x >= self.ge)
            or (self.lt is not None and not x < self.lt)
            or (self.le is not None and not x <= self.le)
        )


POSITIVE = Rule(ge=1)
NON_NEGATIVE = Rule(ge=0)

_RULE = "rule"
_HELP = "help"


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    help: str | None = None,  # noqa: A002 - argparse's and HfArgumentParser's name for it
    repr: bool = True,  # noqa: A002 - dataclasses.field's name for it
    **rule: Any,
) -> Any:
    """A dataclass field with its range and its help declared beside it: ``r: int = option(8, ge=1, help="...")``.

    ``rule`` holds :class:`Rule`'s keywords (``gt``/``ge``/``lt``/``le``/``note``); ``help`` is the
    sentence the command line's help shows for the field (:func:`help_of`).
    """
    metadata: dict[str, Any] = {}
    if rule:
        metadata[_RULE] = Rule(**rule)
    if help is not None:
        metadata[_HELP] = help
    return dataclasses.field(default=default, default_factory=default_factory, repr=repr, metadata=metadata)


def rules_of(cls: type) -> dict[str, Rule]:
    """``{field: Rule}`` declared with :func:`option` on dataclass ``cls``."""
    return {f.name: f.metadata[_RULE] for f in dataclasses.fields(cls) if _RULE in f.metadata}


def help_of(cls: type) -> dict[str, str]:
    """``{field: help}`` declared with :func:`option` on dataclass ``cls``."""
    return {f.name: f.metadata[_HELP] for f in dataclasses.fields(cls) if _HELP in f.metadata}


# ---------------------------------------------------------------------------- types
_NAMES = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}
_PLURALS = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}


def _type_name(tp: Any, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        named = " or ".join(_type_name(a, plural) for a in args if a is not type(None))
        return named + (", or None" if type(None) in args else "")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) == 2 and args[0] == args[1]:
            return f"a pair of {_type_name(args[0], True)}"
        return f"a {origin.__name__} of {_type_name(args[0], True)}" if args else f"a {origin.__name__}"
    if origin is dict or tp is dict:
        return "a mapping"
    table = _PLURALS if plural else _NAMES
    return table.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(tp: Any, rule: Rule | None) -> str:
    """What is accepted, in words: ``an integer >= 1, or None (use None for all batches)``."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    optional = type(None) in args
    main = [a for a in args if a is not type(None)]
    text = " or ".join(_type_name(a) for a in main) or "None"
    if rule is not None and rule.describe():
        seq = any(typing.get_origin(a) in (list, tuple) for a in main)
        text += f" (each {rule.describe()})" if seq else f" {rule.describe()}"
    if optional and main:
        text += ", or None"
    if rule is not None and rule.note:
        text += f" ({rule.note})"
    return text


def fail(name: str, value: Any, accepted: str) -> OptionError:
    """The error for option ``name``; it keeps the name in ``.option`` (a recipe names the section)."""
    shown = f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)
    error = OptionError(f"{name}={shown} is not accepted; expected {accepted}")
    error.option = name
    return error


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(ok, normalised value)`` for ``value`` against the annotation ``tp`` (no ranges)."""
    if tp is Any or tp is object:
        return True, value
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _matches(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return (value in typing.get_args(tp) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        ok = _is_number(value) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        return _matches_sequence(value, tp, origin or tp)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation this layer does not interpret: left to the config class


def _matches_sequence(value: Any, tp: Any, origin: type) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    args = typing.get_args(tp)
    if not args:
        return True, list(value) if origin is list else tuple(value)
    if origin is tuple and Ellipsis not in args:
        if len(value) != len(args):
            return False, value
        pairs = list(zip(value, args))
    else:
        pairs = [(v, args[0]) for v in value]
    out = []
    for v, a in pairs:
        ok, norm = _matches(v, a)
        if not ok:
            return False, value
        out.append(norm)
    return True, out if origin is list else tuple(out)


def _numbers_in(value: Any) -> list[float]:
    if _is_number(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if _is_number(v)]
    return []


def check_value(name: str, value: Any, tp: Any, rule: Rule | None = None) -> Any:
    """Check one option against its annotation and range; return the normalised value."""
    ok, out = _matches(value, tp)
    if not ok or (rule is not None and not all(rule.holds(x) for x in _numbers_in(out))):
        raise fail(name, value, _describe(tp, rule))
    return out


# ---------------------------------------------------------------------------- configs
def _hints(cls: type) -> dict[str, Any]:
    """Field annotations, resolved one by one: one unresolvable annotation leaves the others checked."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - fall back to field by field below
        pass
    namespace = {**vars(typing), **vars(sys.modules.get(cls.__module__, typing))}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        try:
            out[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - annotations
        except Exception:  # noqa: BLE001 - left to the config class
            continue
    return out


def check_names(cls: type, options: Any, *, what: str = "option", owner: str = "") -> None:
    """Every name in ``options`` must be an init field of dataclass ``cls``; an unknown one is an error
    listing the accepted names (and the closest match)."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(
            f"unknown {what}(s) {', '.join(map(repr, unknown))}{owner}{hint}; accepted: {', '.join(sorted(fields))}"
        )


def validate_options(
    cls: type,
    options: dict[str, Any],
    *,
    rules: dict[str, Rule] | None = None,
    what: str = "option",
    owner: str = "",
) -> dict[str, Any]:
    """Check ``options`` against the fields of dataclass ``cls``; return them normalised.

    Ranges come from the fields' own :func:`option` rules, then from ``rules`` (which wins).
    Unknown names are errors listing the accepted ones (and the closest match).
    """
    check_names(cls, options, what=what, owner=owner)
    hints = _cached_hints(cls)
    rules = {**rules_of(cls), **(rules or {})}
    return {name: check_value(name, value, hints.get(name, Any), rules.get(name)) for name, value in options.items()}


def check_field(cls: type, name: str, value: Any) -> Any:
    """One field of dataclass ``cls`` checked against its annotation and declared range; normalised."""
    return check_value(name, value, _cached_hints(cls).get(name, Any), rules_of(cls).get(name))


def validate_fields(obj: Any) -> None:
    """Check every init field of dataclass instance ``obj`` in place (for a ``__post_init__``)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    for name, value in validate_options(type(obj), values).items():
        setattr(obj, name, value)


_HINTS: dict[type, dict[str, Any]] = {}


def _cached_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = _hints(cls)
    return _HINTS[cls]
