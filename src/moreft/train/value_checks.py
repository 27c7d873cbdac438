"""The value checks behind :func:`moreft.train.settings.coerce`: numbers, module names, folder names.

Values arrive from YAML (which reads ``3e-4`` as a string), from command-line flags (strings and
ints) or from Python; errors name the field, the value and the rule.
"""

from __future__ import annotations

import math
import re
from typing import Any

from moreft.config import ALL_LINEAR
from moreft.errors import ConfigError

#: Seeds go to ``random``, numpy and torch; numpy takes at most 32 bits.
MAX_SEED = 2**32 - 1
#: Characters that make a ``target_modules`` value a regex (module names never hold them; ``.`` does
#: appear in dotted names such as ``attention.self.query``, so it alone does not).
REGEX_CHARACTERS = frozenset("\\^$|?*+()[]{}")
_SEPARATORS = re.compile(r"[\s,]+")


def check_int(name: str, value: Any, minimum: float | None, maximum: float) -> int:
    """An integer in ``[minimum, maximum]`` (an integral float such as YAML's ``1e3`` is accepted).

    Raises:
        ConfigError: Not an integer, or out of range.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {int(minimum)}")
    if value > maximum:
        raise ConfigError(f"{name}={value} must be <= {int(maximum)}")
    return value


def check_float(
    name: str,
    value: Any,
    minimum: float | None,
    maximum: float | None,
    *,
    above: bool = False,
    below: bool = False,
) -> float:
    """A finite number within the bounds (``above`` / ``below``: the bound itself is excluded).

    Raises:
        ConfigError: Not a number (YAML's ``3e-4`` string is one), not finite, or out of range.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    value = float(value)
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise ConfigError(f"{name}={value} must be {'>' if above else '>='} {minimum}")
    if maximum is not None and (value >= maximum if below else value > maximum):
        raise ConfigError(f"{name}={value} must be {'<' if below else '<='} {maximum}")
    return value


def check_targets(name: str, value: Any) -> tuple[str, ...] | str | None:
    """``target_modules``: None (the model's default), ``"all-linear"``, one regex, or module names.

    One rule for recipes and flags: a value holding a regex character (:data:`REGEX_CHARACTERS`) is
    a regex and must come alone, as must ``all-linear``; anything else is names, separated by
    spaces or commas (``"query value"``, ``"query,value"``), or listed (``[query, value]``, or
    ``--target-modules query value``).

    Raises:
        ConfigError: Not text or a list of text, no names, or a regex / ``all-linear`` among names.
    """
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(
            f"{name}={value!r} must be module names (a list, or 'query value'), a regex, "
            "'all-linear', or null for the model's default"
        )
    special = [v for v in items if v.strip() == ALL_LINEAR or REGEX_CHARACTERS.intersection(v)]
    if special and len(items) == 1:
        return items[0].strip() if items[0].strip() == ALL_LINEAR else items[0]
    if special:
        raise ConfigError(
            f"{name}={list(items)!r}: {special[0]!r} is a regex or 'all-linear', which must be "
            "given alone, not among module names"
        )
    names = tuple(n for v in items for n in _SEPARATORS.split(v) if n)
    if not names:
        raise ConfigError(
            f"{name}={value!r} names no module; give names, a regex, 'all-linear', or null for "
            "the model's default"
        )
    return names


#: Longest folder name accepted (bytes of UTF-8), leaving room under NAME_MAX (255) for temp-file prefixes.
MAX_NAME_BYTES = 200


def check_folder_name(name: str, value: Any) -> str:
    """A run or comparison folder name: one path component we can create and find again.

    Raises:
        ConfigError: Empty, ``.`` / ``..``, a path separator, a control character, a leading ``.``
            (moreft's temp files are hidden siblings), or longer than :data:`MAX_NAME_BYTES`.
    """
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or value.startswith(".")
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
        or len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80]) + "..."
        raise ConfigError(
            f"{name}={shown} must be a non-empty folder name without '/' (nor '\\', control "
            f"characters or a leading '.'), at most {MAX_NAME_BYTES} bytes"
        )
    return value
