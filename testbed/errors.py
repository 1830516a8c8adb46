"""Errors users see. Every bad input becomes one ConfigError naming the field and what is allowed."""

from __future__ import annotations


class TestbedError(Exception):
    """Base class for errors the testbed raises on purpose."""


class ConfigError(TestbedError, ValueError):
    """A parameter or config field has a value that is not allowed.

    The message always reads: ``<field>: got <value!r>; allowed: <allowed>``.
    """

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; allowed: {allowed}")


class CommError(TestbedError, RuntimeError):
    """A collective failed: a peer is gone, unreachable, out of step, or a deadline passed."""


class AccessDenied(TestbedError):
    """A request the node authenticated but may not grant (a file outside its allowed directories).

    The message always reads: ``<field>: <path> <why>; <what would allow it>``.
    """

    def __init__(self, field: str, path: str, why: str):
        self.field, self.path, self.why = field, path, why
        super().__init__(f"{field}: {path!r} {why}")


def check(cond: bool, field: str, value: object, allowed: str) -> None:
    """Raise ConfigError(field, value, allowed) unless cond holds."""
    if not cond:
        raise ConfigError(field, value, allowed)
