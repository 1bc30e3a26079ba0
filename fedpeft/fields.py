"""Validated dataclass fields: config keys and codec parameters declare and check values the same way.

A field declares its allowed ``choices`` (a tuple, or a function returning the names of a registry, read
when a value is checked so that declaring a field imports nothing) or an inclusive range ``lo``..``hi``
(``lo_open`` makes the lower bound exclusive); every float must be finite. :func:`check` enforces the type
and those limits and raises a :class:`ConfigError` that names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from fedpeft.errors import ConfigError

Choices = tuple[Any, ...] | Callable[[], list[str]] | None


def option(default: Any, *, choices: Choices = None, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, help: str = "") -> Any:
    """A dataclass field with validation metadata (allowed choices, range, help text)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "help": help}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> tuple[Any, ...]:
    """The allowed values of ``f`` (empty: any value of its type)."""
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices or ())


def _from_text(where: str, ftype: Any, value: Any) -> Any:
    """A number written as text (a codec spec)."""
    if ftype in (int, float) and isinstance(value, str):
        try:
            value = ftype(value)
        except ValueError:
            raise ConfigError(f"{where} = {value!r}: expected {'an integer' if ftype is int else 'a number'}") from None
    return value


def _typed(where: str, ftype: Any, value: Any) -> Any:
    if typing.get_origin(ftype) in (list, types.GenericAlias) or ftype == list[str]:
        integers = typing.get_args(ftype) == (int,)  # list[int]: whole numbers (also written as "0,3" or 0)
        if integers and isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # --set adversary.clients=0: one client
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            if integers and all(v.lstrip("-").isdigit() for v in value):
                value = [int(v) for v in value]
        kind, ok = ("integers", lambda v: isinstance(v, int) and not isinstance(v, bool)) if integers else \
            ("strings", lambda v: isinstance(v, str))
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise ConfigError(f"{where} = {value!r}: expected a list of {kind}")
        return list(value)
    if ftype is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r}: expected true or false")
    if ftype is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        value = float(value)
        if not math.isfinite(value):  # TOML and --set accept nan and inf; no key means either
            raise ConfigError(f"{where} = {value!r}: expected a finite number")
    if ftype is str and not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r}: expected a string")
    return value


def _allowed_range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    bounds = ([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []) + ([f"<= {hi}"] if hi is not None else [])
    return "must be " + " and ".join(bounds)


def check(where: str, f: dataclasses.Field, ftype: Any, value: Any, *, text: bool = False) -> Any:
    """Return ``value`` checked (and coerced) against field ``f`` of type ``ftype``; ``where`` names it in errors.

    ``text``: the value was written in a spec string (numbers arrive as text, the choices are shown unquoted
    as they are written there); otherwise it came from TOML.
    """
    if text:
        value = _from_text(where, ftype, value)
    value = _typed(where, ftype, value)
    choices = choices_of(f)
    if choices and value not in choices:
        allowed = ", ".join(str(c) if text else repr(c) for c in choices)
        raise ConfigError(f"{where} = {value!r} is not allowed; choose one of: {allowed}")
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open", False)
    if lo is not None and (value <= lo if lo_open else value < lo):
        below = f"is not above {lo}" if lo_open else f"is below the minimum {lo}"
        raise ConfigError(f"{where} = {value!r} {below} ({_allowed_range(lo, hi, lo_open)})")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} = {value!r} is above the maximum {hi} ({_allowed_range(lo, hi, lo_open)})")
    return value
