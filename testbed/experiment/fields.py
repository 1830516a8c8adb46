"""Typed reading of a YAML tree with the YAML path of every value in its errors.

Every reader takes the value and its path (``methods[2].params.groups``) and
either returns the typed value or raises ONE ``ConfigError(path, value, allowed)``.
The spec (spec.py) is written with these so that each field states its type and
range in one line, and every error names the field the user has to fix.
"""

from __future__ import annotations

from typing import Any

from testbed.errors import ConfigError, check


def join(path: str, key: str | int) -> str:
    """Path of a child: ``a.b`` for a key, ``a[3]`` for a list index."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def mapping(v: Any, path: str, keys: dict[str, bool]) -> dict:
    """A mapping whose keys are all in ``keys`` (name -> required). Unknown or missing keys are errors."""
    check(isinstance(v, dict), path or "experiment", v, "a mapping with keys " + ", ".join(keys))
    for k in v:
        if k not in keys:
            raise ConfigError(join(path, str(k)), v[k], f"no such field here; allowed fields: {', '.join(keys)}")
    for k, required in keys.items():
        if required and k not in v:
            raise ConfigError(join(path, k), None, "this field is required")
    return v


def seq(v: Any, path: str, what: str, min_len: int = 1) -> list:
    check(isinstance(v, list) and len(v) >= min_len, path, v, f"a list of {what} (at least {min_len})")
    return v


def integer(v: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
    ok = is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    check(ok, path, v, _range("an integer", lo, hi))
    return v


def number(v: Any, path: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    ok = is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    check(ok, path, v, _range("a number", lo, hi, lo_open))
    return float(v)


def string(v: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
    if choices is not None:
        check(isinstance(v, str) and v in choices, path, v, " | ".join(choices))
    else:
        check(isinstance(v, str) and v != "", path, v, "a non-empty string")
    return v


def optional(v: Any, reader, *args, **kw):
    """``reader(v, ...)`` unless v is None."""
    return None if v is None else reader(v, *args, **kw)


def _range(what: str, lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{what} <= {hi:g}"
    return what


def rebase(err: ConfigError, path: str) -> ConfigError:
    """The same error with its field placed under ``path`` (for errors raised by other modules' validators)."""
    field = err.field if not path else (f"{path}{err.field}" if err.field.startswith("[") else join(path, err.field))
    return ConfigError(field, err.value, err.allowed)
