"""Declared options: a dataclass field with its help and its range, all checked by one function.

The configurations (:class:`~bleep_rs.inputs.InputSpec`, :class:`~bleep_rs.training.TrainConfig`,
:class:`~bleep_rs.predict.PredictConfig`) are made of these fields; the command line makes its flags from
them. So each option's default, range, help and flag name are written once, here in its field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import typing
from typing import Any, Callable, Optional

from ._core import BleepError

__all__ = ["option", "nested", "flag", "check", "from_flags", "flat_fields"]


def option(default, help: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           check: Optional[Callable[[Any], Optional[str]]] = None, **kw):
    """A config field with its command-line help and its range: numbers (each element of a list or
    tuple) must be finite and within [low, high] (``low_open`` / ``high_open``: the bound excluded);
    ``choices``: the values allowed; ``check``: a further test returning what is wrong (or None);
    ``flag``: the flag when it is not ``--field-name``; ``path``: a path-like string; ``file``: a list read
    from a file of one item per line on the command line; ``invert``: the flag sets False; ``metavar``: the
    flag's placeholder in the help."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "check": check, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls, help: str = ""):
    """A config field holding another config (its options become flags of their own)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "nested": cls})


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _range(meta) -> str:
    low, high = meta["low"], meta["high"]
    if low == 0 and meta["low_open"] and high is None:
        return "a positive finite number"
    parts = []
    if low is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {high}")
    return "a finite number " + " and ".join(parts) if parts else "a finite number"


def _problem(value, kind, meta) -> Optional[str]:
    """What is wrong with one value of a field of type ``kind`` (None: nothing)."""
    origin, args = typing.get_origin(kind), [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is typing.Union:
        if value is None:
            return None if type(None) in typing.get_args(kind) else "must be given"
        return _problem(value, args[0], meta)
    if value is None:
        return "must be given"
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {value!r}"
        if meta["low"] is not None and not value:
            return "must list at least one value"
        return next((p for v in value if (p := _problem(v, args[0], meta))), None)
    if kind is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind is str:
        if meta.get("path") and isinstance(value, os.PathLike):
            return None
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
    elif kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"must be a whole number, got {value!r}"
    elif kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number, got {value!r}"
        low, high = meta["low"], meta["high"]
        bad = not isinstance(value, numbers.Integral) and not math.isfinite(value)  # (an int too large for a float is finite)
        bad |= low is not None and (value <= low if meta["low_open"] else value < low)
        bad |= high is not None and (value >= high if meta["high_open"] else value > high)
        if bad:
            what = "a whole number" if kind is int else _range(meta)
            if kind is int and (low is not None or high is not None):
                what += " " + _range(meta).removeprefix("a finite number ")
            return f"must be {what}, got {value!r}"
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    return None


def _as_declared(value, kind, meta):
    """The value as the field declares it: Python numbers (not numpy's: config.json), tuples where the
    field is a tuple, paths as strings."""
    origin, args = typing.get_origin(kind), [a for a in typing.get_args(kind) if a is not type(None)]
    if value is None:
        return None
    if origin is typing.Union:
        return _as_declared(value, args[0], meta)
    if origin in (list, tuple):
        return origin(_as_declared(v, args[0], meta) for v in value)
    if kind in (int, float) and not isinstance(value, bool):
        return kind(value)
    if meta.get("path") and isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def check(obj, *, flags: bool = False) -> None:
    """Checks every field of the config ``obj`` against its declared type, range and test, and stores each
    value as declared: a :class:`BleepError` naming the field (``flags``: its command-line flag) and the
    value. A nested config is checked where it was made (``from_flags`` checks it with the flags)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        sub = f.metadata.get("nested")
        if sub is not None:
            if not isinstance(value, sub):
                raise BleepError(f"{f.name} must be of type {sub.__name__}, got {value!r}")
            continue
        why = _problem(value, hints[f.name], f.metadata)
        if why is None and value is not None and f.metadata.get("check"):
            why = f.metadata["check"](value)
        if why:
            raise BleepError(f"{flag(f) if flags else f.name} {why}")
        object.__setattr__(obj, f.name, _as_declared(value, hints[f.name], f.metadata))  # frozen configs too


def from_flags(cls, values: dict):
    """The config ``cls`` of command-line options ``values`` (one per field, nested configs' fields at the
    same level), checked with the errors naming the flags."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("nested")
        kwargs[f.name] = from_flags(sub, values) if sub is not None else values[f.name]
    unchecked = cls.__new__(cls)
    for name, value in kwargs.items():
        object.__setattr__(unchecked, name, value)
    check(unchecked, flags=True)
    return cls(**kwargs)


def flat_fields(cls) -> list:
    """``(field, type)`` of every option of ``cls``, nested configs' options in their place."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("nested")
        out.extend(flat_fields(sub) if sub is not None else [(f, hints[f.name])])
    return out
