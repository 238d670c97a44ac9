"""Dataclass configs from the command line: `NAME=VALUE` strings read by each field's declared type, and
the fields' own docs as `--help` text.

One dataclass is the config (a metric's parameters, `TrainConfig`): its annotations say how a value is
read, its `__post_init__` validates, and the doc of each field (`#:` comment lines above it, or a docstring
below it) is what `--help` shows.  VALUE is read by the field's type:

    bool           true/false, yes/no, on/off, 1/0 (any case); anything else is an error
    int            1024, 1_000, 1e6 (an integral value)
    float          0.5, 1e-3 (finite)
    str            the text as given
    X | None       the word `none` (any case) gives None, anything else is read as X
    Literal[...]   one of the listed values

Every problem is a one-line ValueError naming the flag, the item and what was expected, e.g.
`bad --param 'probes.l2=abc': expected a float`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class _Unreadable(Exception):
    """A value that does not fit the type; the caller words the message."""


def split_assignment(item: str, flag: str, usage: str) -> tuple[str, str]:
    """`NAME=VALUE` -> (NAME, VALUE), split at the first `=`; `usage` says the form in the error."""
    name, eq, value = item.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"bad {flag} {item!r}: use {usage}")
    return name.strip(), value


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved (`from __future__ import annotations` makes them strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc, one paragraph: the `#:` comment lines right above it, else the docstring below it.

    Read from the class's source; a field without either (or a class without source) has no entry.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    docs = {}
    for i, stmt in enumerate(node.body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        for line in reversed(lines[: stmt.lineno - 1]):
            if not line.strip().startswith("#:"):
                break
            above.append(line.strip()[2:].strip())
        doc = " ".join(reversed(above))
        below = node.body[i + 1] if i + 1 < len(node.body) else None
        if not doc and isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant):
            if isinstance(below.value.value, str):
                doc = " ".join(below.value.value.split())
        if doc:
            docs[stmt.target.id] = doc
    return docs


def type_name(tp: Any) -> str:
    """How `--help` writes a field's type: `float`, `int | None`, `{float32, float64}`."""
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ", ".join(str(a) for a in typing.get_args(tp)) + "}"
    if _is_union(tp):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _expected(tp: Any) -> str:
    """What a value of type tp looks like, for error messages."""
    if tp is bool:
        return "a boolean (true/false, yes/no, on/off, 1/0)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join("none" if a is type(None) else _expected(a) for a in typing.get_args(tp))
    return type_name(tp)


def _read(text: str, tp: Any) -> Any:
    """The command-line text `text` as a value of type tp; _Unreadable if it is not one."""
    word = text.strip().lower()
    if _is_union(tp):
        arms = typing.get_args(tp)
        if type(None) in arms and word == "none":
            return None
        for arm in arms:
            if arm is not type(None):
                try:
                    return _read(text, arm)
                except _Unreadable:
                    pass
        raise _Unreadable
    if typing.get_origin(tp) is typing.Literal:
        for choice in typing.get_args(tp):
            try:
                if _read(text, type(choice)) == choice:
                    return choice
            except _Unreadable:
                pass
        raise _Unreadable
    if tp is bool:
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise _Unreadable
    if tp is int:
        try:
            return int(word)
        except ValueError:
            pass
        try:
            number = float(word)  # 1e6
        except ValueError:
            raise _Unreadable from None
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise _Unreadable
    if tp is float:
        try:
            number = float(word)
        except ValueError:
            raise _Unreadable from None
        if not math.isfinite(number):
            raise _Unreadable
        return number
    if tp is str:
        return text
    raise TypeError(f"a field of type {type_name(tp)} cannot be set from the command line")


def _check(value: Any, tp: Any) -> Any:
    """A value given in Python (not as text) checked against tp; an int for a float field becomes a float,
    as `float(text)` would make it, so equal settings serialise alike."""
    if _is_union(tp):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arm)
            except _Unreadable:
                pass
        raise _Unreadable
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Unreadable
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
        raise _Unreadable
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise _Unreadable


def convert(
    cls: type, values: Mapping[str, Any], *, flag: str, prefix: str = "", owner: str | None = None
) -> dict[str, Any]:
    """{field: value} -> {field: typed value} for dataclass cls: strings are read by the field's type,
    other values are checked against it.

    `flag` and `prefix` reconstruct the command-line item for messages (`--param`, `probes.`), `owner`
    names the dataclass there ("metric 'probes'"; default the class name).
    """
    types_ = field_types(cls)
    owner = owner or cls.__name__
    out = {}
    for name, value in values.items():
        item = f"{prefix}{name}={value}" if isinstance(value, str) else f"{prefix}{name}={value!r}"
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"bad {flag} {item!r}: {owner} has no parameter {name!r}{hint}; "
                f"it has: {', '.join(types_) or 'none'}"
            )
        tp = types_[name]
        try:
            out[name] = _read(value, tp) if isinstance(value, str) else _check(value, tp)
        except _Unreadable:
            raise ValueError(f"bad {flag} {item!r}: expected {_expected(tp)}") from None
        except TypeError as exc:
            raise ValueError(f"bad {flag} {item!r}: {exc}") from None
    return out


def parse_assignments(
    cls: type, items: Iterable[str], *, flag: str, usage: str = "NAME=VALUE", owner: str | None = None
) -> dict[str, Any]:
    """`NAME=VALUE` items -> {field: typed value} for dataclass cls; a later item wins over an earlier one."""
    values: dict[str, str] = {}
    for item in items:
        name, value = split_assignment(item, flag, usage)
        values[name] = value
    return convert(cls, values, flag=flag, owner=owner)


def build(
    cls: type, values: Mapping[str, Any], *, flag: str, prefix: str = "", owner: str | None = None
) -> Any:
    """An instance of dataclass cls with `values` (see `convert`) over its defaults; its `__post_init__`
    validates the whole."""
    return cls(**convert(cls, values, flag=flag, prefix=prefix, owner=owner))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:_}"  # 10_000_000 reads better than 10000000, and parses back
    return repr(value)


def describe_fields(cls: type, indent: int = 2, width: int = 100) -> str:
    """The fields of dataclass cls for `--help`: `name: type = default` and the field's doc under it."""
    docs, types_ = field_docs(cls), field_types(cls)
    pad = " " * indent
    lines = []
    for f in dataclasses.fields(cls):
        lines.append(f"{pad}{f.name}: {type_name(types_[f.name])} = {_default_text(f)}")
        if f.name in docs:
            under = pad + "    "
            lines.extend(textwrap.wrap(docs[f.name], width, initial_indent=under, subsequent_indent=under))
    return "\n".join(lines) if lines else f"{pad}(no parameters)"
