"""Per-field checks of the adapter configs (:mod:`moreft.config`): enums, positive integers, names, targets.

Kept apart from :mod:`moreft.config` so the dataclasses stay short; ``moreft.config`` re-exports
``coerce_enum``, ``positive_int`` and ``ALL_LINEAR``.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import regex

from .errors import ConfigError

ALL_LINEAR = "all-linear"
#: A ``target_modules`` regex longer than this is refused (names are better listed).
MAX_PATTERN_CHARS = 1000


E = TypeVar("E", bound=enum.Enum)


def coerce_enum(enum_type: type[E], value: Any, field: str) -> E:
    """Return ``value`` as a member of ``enum_type``, accepting members and their string values.

    Raises:
        ConfigError: if ``value`` names no member.
    """
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        for member in enum_type:
            if value.lower() in (member.value, member.name.lower()):
                return member
    valid = ", ".join(repr(m.value) for m in enum_type)
    raise ConfigError(f"{field}={value!r} is not one of {valid}")


def positive_int(field: str, value: Any) -> int:
    """Check that ``value`` is an int >= 1 (bools and floats are refused).

    Raises:
        ConfigError: if it is not.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}={value!r} must be an integer >= 1 (got {type(value).__name__})")
    if value < 1:
        raise ConfigError(f"{field}={value!r} must be an integer >= 1")
    return value


def _probability(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{field}={value!r} must be a number in [0, 1)")
    return float(value)


def _names(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{field}={value!r} must be a list of non-empty module names")
    return tuple(value)


def _targets(value: Any) -> tuple[str, ...] | str | None:
    """Normalise ``target_modules``: None (model default), a regex string, or a tuple of names."""
    if value is None or value == ALL_LINEAR:
        return value
    if isinstance(value, str):
        if len(value) > MAX_PATTERN_CHARS:
            raise ConfigError(
                f"target_modules is a regex of {len(value):,} characters; at most "
                f"{MAX_PATTERN_CHARS:,} are accepted (list the names instead)"
            )
        try:
            regex.compile(value)
        except (regex.error, RecursionError, OverflowError) as exc:
            raise ConfigError(f"target_modules={value!r} is not a valid regular expression: {exc}") from None
        return value
    names = _names("target_modules", value)
    if not names:
        raise ConfigError("target_modules=[] selects nothing; give names, a regex, 'all-linear' or None")
    return names
