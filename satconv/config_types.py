"""The config schema's type machinery: field constraints, and strict conversion of plain data into dataclasses.

:mod:`satconv.config` declares the schema (frozen dataclasses whose fields carry type hints and, through
:func:`positive`, :func:`non_negative`, :func:`probability`, :func:`odd_positive` or :func:`check`, a
constraint).  :func:`build` turns plain data as YAML gives it into such a dataclass: unknown keys, wrong
types, non-finite numbers and values failing a constraint raise a :class:`ConfigError` that names the
source, the dotted key path, the bad value and what is allowed.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import field, fields, is_dataclass
from typing import Any, Callable, Literal, Union

#: cross-field checks :func:`build` runs on each dataclass it builds: ``validate(obj, data, source, prefix)``
Validator = Callable[[Any, dict, str, str], None]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names file, key path, value and what is allowed.

    Attributes:
        source, key, value, allowed: the constructor's arguments (where, which dotted key, the bad value,
            a phrase saying what is allowed).
    """

    def __init__(self, source: str, key: str, value: Any, allowed: str):
        self.source, self.key, self.value, self.allowed = source, key, value, allowed
        super().__init__(f"{source}: {key}: got {value!r}; {allowed}")


def check(pred: Callable[[Any], bool], allowed: str) -> dict:
    """Field metadata: a predicate over the (already type-checked) value and a phrase for errors.

    Args:
        pred: ``pred(value) -> bool``, true when the value is allowed.
        allowed: what is allowed, as the error message says it (``"must be > 0"``).

    Returns:
        ``{"check": pred, "allowed": allowed}``, for :func:`dataclasses.field`'s ``metadata``.
    """
    return {"check": pred, "allowed": allowed}


def positive(**kw):
    """A dataclass field whose value must be finite and > 0 (``kw``: as for :func:`dataclasses.field`)."""
    return field(metadata=check(lambda v: math.isfinite(v) and v > 0, "must be > 0"), **kw)


def non_negative(**kw):
    """A dataclass field whose value must be finite and >= 0."""
    return field(metadata=check(lambda v: math.isfinite(v) and v >= 0, "must be >= 0"), **kw)


def probability(**kw):
    """A dataclass field whose value must lie in [0, 1)."""
    return field(metadata=check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"), **kw)


def odd_positive(**kw):
    """A dataclass field whose value must be a positive odd integer."""
    return field(metadata=check(lambda v: v > 0 and v % 2 == 1, "must be a positive odd integer"), **kw)


def type_name(tp) -> str:
    """How a field's type reads in an error message or a key table (``"a number"``, ``"one of 'a', 'b'"``).

    Args:
        tp: a type hint of the schema: int, float, bool, str, a Literal, an Optional/Union, a tuple or a
            dataclass.

    Returns:
        A phrase such as ``"a list of 3 values (a number, a number, a number)"``.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(type_name(a) for a in args)})"
    if is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def convert(tp, value, source: str, key: str, validate: Validator | None = None):
    """Convert ``value`` to type ``tp`` or raise :class:`ConfigError` naming ``key``.

    Args:
        tp: the target type hint (see :func:`type_name`).
        value: plain data as YAML gives it (lists for tuples, mappings for dataclasses).
        source: where the value came from (a file name, ``--set``), for errors.
        key: its dotted key path, for errors.
        validate: cross-field checks run on every dataclass built (see :func:`build`).

    Returns:
        The value as ``tp`` (lists become tuples, mappings become dataclasses).
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, source, key, validate)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(source, key, value, f"allowed: {type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, value, f"expected {type_name(tp)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, source, f"{key}[{i}]", validate) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(source, key, value, f"expected {type_name(tp)}")
        return tuple(convert(a, v, source, f"{key}[{i}]", validate) for i, (a, v) in enumerate(zip(args, value)))
    if is_dataclass(tp):
        return build(tp, value, source, key, validate)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        # PyYAML reads "1e-4" (no dot) as a string; float() of a huge integer overflows
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                number = math.inf if isinstance(value, int) else None
        if number is not None:
            if not math.isfinite(number):  # .inf, .nan, "inf", 1e999: no field of the schema takes them
                raise ConfigError(source, key, value, "expected a finite number (not inf or nan)")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(source, key, value, f"expected {type_name(tp)}")


def build(cls, data, source: str, prefix: str, validate: Validator | None = None):
    """Build the dataclass ``cls`` from a mapping, refusing unknown keys, wrong types and values that fail a
    field's constraint (:func:`check`).

    Args:
        cls: a dataclass whose fields carry type hints (nested dataclasses are built recursively).
        data: a mapping of field names to plain values, or ``None`` (all defaults).
        source: where the data came from, for errors.
        prefix: the dotted key path of ``data`` (``""`` at the top level), for errors.
        validate: ``validate(obj, data, source, prefix)``, cross-field checks run on every dataclass built
            (innermost first); it raises :class:`ConfigError`.

    Returns:
        The ``cls`` instance.

    Raises:
        ConfigError: naming the source, key path, bad value and what is allowed.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix or "<top level>", data, f"expected {type_name(cls)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(source, key, value, f"unknown key; allowed keys here: {', '.join(known)}")
        converted = convert(hints[name], value, source, key, validate)
        meta = known[name].metadata
        if converted is not None and "check" in meta and not meta["check"](converted):
            raise ConfigError(source, key, value, meta["allowed"])
        kwargs[name] = converted
    obj = cls(**kwargs)
    if validate is not None:
        validate(obj, data, source, prefix)
    return obj


__all__ = ["ConfigError", "Validator", "check", "positive", "non_negative", "probability", "odd_positive", "type_name",
           "convert", "build"]
