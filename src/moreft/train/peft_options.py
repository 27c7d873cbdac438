"""Converting a peft arm's option values by the field types of peft's config class.

:func:`moreft.train.peft_arm.convert_options` hands each option here with its field's resolved type
hint: a value is accepted (and normalised to a plain, YAML-ready value) by the first arm of the hint's
union that takes it, else a ConfigError names the types the field takes.
"""

from __future__ import annotations

import enum
import json
import math
import typing
from collections.abc import Mapping
from typing import Any

from moreft.errors import ConfigError
from moreft.train.type_words import type_in_words, union_members


class _Refused(ValueError):
    pass


def convert_value(what: str, value: Any, hint: Any) -> Any:
    """``value`` as the field typed ``hint`` takes it, or ConfigError naming the type."""
    arms = union_members(hint)
    if value is None:
        if type(None) in arms:
            return None
        raise ConfigError(f"{what}=None: this option cannot be null (it takes {type_in_words(hint)})")
    for arm in arms:
        if arm is type(None):
            continue
        try:
            return _one(arm, value)
        except _Refused:
            continue
    raise ConfigError(f"{what}={value!r} must be {type_in_words(hint)}")


def _one(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return json.loads(json.dumps(value))
    if origin is typing.Literal:
        for choice in typing.get_args(hint):
            if value == choice or (
                isinstance(value, str) and isinstance(choice, str) and value.lower() == choice.lower()
            ):
                return choice
        raise _Refused
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _Refused
    if origin is int:
        if isinstance(value, bool):
            raise _Refused
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise _Refused
    if origin is float:
        if isinstance(value, bool):
            raise _Refused
        try:
            number = float(value) if isinstance(value, (int, float, str)) else math.nan
        except ValueError:
            raise _Refused from None
        if not math.isfinite(number):
            raise _Refused
        return number
    if origin is str:
        if isinstance(value, str):
            return value
        raise _Refused
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Refused
        inner = typing.get_args(hint)
        return [_one(inner[0], v) if inner else v for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Refused
        try:
            return json.loads(json.dumps(dict(value), allow_nan=False))
        except (TypeError, ValueError, RecursionError):
            raise _Refused from None
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        for member in origin:
            if value == member.value or (
                isinstance(value, str) and value.lower() in (str(member.value).lower(), member.name.lower())
            ):
                return member.value
        raise _Refused
    raise _Refused  # a nested config object: not settable from a run config
