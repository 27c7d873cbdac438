"""Checking and normalising :class:`~moreft.train.config.TrainConfig` field values.

Values arrive from YAML (which reads ``3e-4`` as a string), from command-line flags (strings and
ints) or from Python; each is checked against its field's kind and range, and errors name the
field, the value and the rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from moreft.errors import ConfigError

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

# name -> (kind, minimum); kinds: int, float, str, bool, opt_int, opt_str, targets, dict
_SPEC: dict[str, tuple[str, float | None]] = {
    "task": ("str", None), "model": ("str", None), "method": ("str", None), "operator": ("str", None), "sharing_layout": ("str", None),
    "lr_scheduler": ("str", None), "precision": ("str", None), "output_dir": ("str", None),
    "run_name": ("opt_str", None), "task_options": ("dict", None), "target_modules": ("targets", None),
    "block_rank": ("int", 1), "nblocks": ("int", 1), "rank": ("int", 1), "r_hat": ("opt_int", 1),
    "batch_size": ("int", 1), "eval_batch_size": ("opt_int", 1), "max_steps": ("opt_int", 1),
    "warmup_steps": ("int", 0), "grad_accum": ("int", 1), "seed": ("int", 0), "max_length": ("int", 8),
    "max_new_tokens": ("int", 1), "max_examples": ("opt_int", 3), "eval_examples": ("opt_int", 1),
    "eval_every": ("opt_int", 1), "save_every": ("opt_int", 1), "keep_checkpoints": ("int", 1),
    "log_every": ("int", 1), "alpha": ("float", 0.0), "dropout": ("float", 0.0), "lr": ("float", 0.0),
    "epochs": ("float", 0.0), "warmup_ratio": ("float", 0.0), "weight_decay": ("float", 0.0),
    "max_grad_norm": ("float", 0.0), "resume": ("bool", None), "group_by_length": ("bool", None), "overwrite": ("bool", None),
    "progress": ("bool", None), "nonfinite": ("str", None),
    "merge_every": ("opt_int", 1), "merge_warmup": ("opt_int", 0),
    "merge_schedule": ("str", None), "merge_cycle": ("str", None), "r_hat_rounding": ("str", None),
    "cap_r_hat": ("bool", None), "sharing_output_layout": ("opt_str", None), "block_rule": ("str", None),
}
_UPPER = {"dropout": 1.0, "warmup_ratio": 1.0}  # exclusive upper bounds
#: Seeds go to ``random``, numpy and torch; numpy takes at most 32 bits.
MAX_SEED = 2**32 - 1
#: Inclusive upper bounds of integer fields; every other integer stays below 2**62 (C code takes int64).
_INT_UPPER = {"seed": MAX_SEED}
_INT_MAX = 2**62
_POSITIVE = {"alpha", "lr", "epochs"}  # strictly > 0


def coerce_field(name: str, value: Any) -> Any:
    """Check and normalise one field value (YAML gives ``3e-4`` as a string; accept that).

    Raises:
        ConfigError: The value has the wrong type or is out of range.
    """
    kind, minimum = _SPEC[name]
    if kind.startswith("opt_"):
        if value is None:
            return None
        kind = kind[4:]
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name}={value!r} must be a non-empty string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if kind == "dict":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}={value!r} must be a mapping of option name to value")
        return dict(value)
    if kind == "targets":
        return _targets(value)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value} must be >= {int(minimum)}")
        upper = _INT_UPPER.get(name, _INT_MAX)
        if value > upper:
            raise ConfigError(f"{name}={value} must be <= {upper}")
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    value = float(value)
    if value < (minimum or 0.0) or (name in _POSITIVE and value <= 0):
        raise ConfigError(f"{name}={value} must be {'> 0' if name in _POSITIVE else '>= 0'}")
    if name in _UPPER and value >= _UPPER[name]:
        raise ConfigError(f"{name}={value} must be < {_UPPER[name]}")
    return value


def _targets(value: Any) -> tuple[str, ...] | str | None:
    """None, ``"all-linear"``, a regex, or names (a list, or a comma-separated string)."""
    if value is None:
        return None
    if isinstance(value, str):
        if "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif value == "all-linear" or not _PLAIN_NAME.fullmatch(value):
            return value
        else:
            return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"target_modules={value!r} must be module names (a list or 'query,value'), a regex, "
                      "'all-linear', or null for the model's default")


#: Longest folder name accepted (bytes of UTF-8), leaving room under NAME_MAX (255) for temp-file prefixes.
MAX_NAME_BYTES = 200


def check_folder_name(name: str, value: Any) -> str:
    """A run or comparison folder name: one path component we can create and find again.

    Raises:
        ConfigError: Empty, ``.`` / ``..``, a path separator, a control character, a leading ``.``
            (moreft's temp files are hidden siblings), or longer than :data:`MAX_NAME_BYTES`.
    """
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
            or value.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in value) \
            or len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80]) + "..."
        raise ConfigError(f"{name}={shown} must be a non-empty folder name without '/' (nor '\\', control "
                          f"characters or a leading '.'), at most {MAX_NAME_BYTES} bytes")
    return value

