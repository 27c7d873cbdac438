"""Arms: the method specs ``moreft compare``, ``moreft search`` and ``moreft study`` train.

A spec is ``method:key=value,...``:

* moreft's methods: ``lora:rank=8``, ``more:block_rank=4,nblocks=2``, ``mora:rank=8,operator=sharing``;
  keys are run settings (adapter settings, or shared ones such as ``lr`` that the arm overrides);
* any peft method: ``peft:<type>:key=value,...``, e.g. ``peft:vera:r=256``, ``peft:boft:boft_block_size=4``,
  ``peft:c3a:block_size=64``; keys are options of peft's config class for the type
  (:mod:`moreft.train.peft_arm`), or run settings the arm overrides (``lr``, ``target_modules``);
* a method without options is its name alone (``lora``; a later method such as ``full`` the same way).

Values are read as YAML (``r=256`` is a number). :func:`arm_changes` turns a parsed spec into the
:class:`~moreft.train.config.TrainConfig` changes of that arm.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from moreft.errors import ConfigError
from moreft.train.bounded import load_yaml
from moreft.train.choices import TRAIN_METHODS, RunMethod
from moreft.train.config import ADAPTER_SETTINGS, PEFT_SETTINGS, TrainConfig, field_names
from moreft.train.settings import coerce, specs

#: Fields a spec may not set (the comparison owns them).
RESERVED = (
    "task",
    "task_options",
    "model",
    "seed",
    "run_name",
    "output_dir",
    "resume",
    "overwrite",
    *PEFT_SETTINGS,
)


def _items(spec: str, rest: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method spec {spec!r}: {item!r} must look like key=value")
        out.append((key.strip(), raw))
    return out


def parse_method_spec(spec: str) -> dict[str, Any]:
    """Parse ``"more:block_rank=4,nblocks=2"`` into ``{"method": "more", "block_rank": 4, "nblocks": 2}``, or
    ``"peft:vera:r=256,lr=1e-2"`` into ``{"method": "peft", "peft_type": "vera", "peft_options": {"r": 256},
    "lr": 0.01}``.

    Raises:
        ConfigError: Unknown method or peft type, a malformed ``key=value``, or a key that is neither a
            setting an arm may change nor (peft) an option of the peft config (close names suggested).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"method spec {spec!r} must be text such as lora:rank=8 or peft:vera:r=256")
    method, _, rest = spec.strip().partition(":")
    method = method.lower()  # choices are accepted in any case, as everywhere
    if method not in TRAIN_METHODS:
        raise ConfigError(
            f"method spec {spec!r}: unknown method {method!r}; valid methods are {list(TRAIN_METHODS)} "
            "(e.g. lora:rank=8, more:block_rank=4, mora:rank=8, peft:vera:r=256)"
        )
    allowed = [k for k in field_names() if k not in RESERVED and k != "method"]
    out: dict[str, Any] = {"method": method}
    options: dict[str, Any] = {}
    fields: list[str] = []
    if method == RunMethod.PEFT:
        from moreft.train.peft_arm import config_class, convert_options, option_fields

        peft_type, _, rest = rest.partition(":")
        if not peft_type.strip():
            raise ConfigError(
                f"method spec {spec!r}: a peft arm names its type, peft:<type>:key=value,... "
                "(e.g. peft:vera:r=256)"
            )
        name, cls = config_class(peft_type.strip())
        fields = list(option_fields(cls))
        out["peft_type"] = name
        allowed = [k for k in allowed if k not in ADAPTER_SETTINGS or k == "target_modules"]
    for key, raw in _items(spec, rest):
        value = load_yaml(raw, f"method spec {spec!r}")
        if key in fields:
            options[key] = value
        elif key in allowed:
            out[key] = value
        else:
            close = difflib.get_close_matches(key, fields + allowed, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            what = f"an option of peft:{out['peft_type']} nor " if method == RunMethod.PEFT else ""
            raise ConfigError(
                f"method spec {spec!r}: {key!r} is not {what}a setting a method may change{hint} "
                f"Valid keys: {fields + allowed}"
            )
    if method == RunMethod.PEFT:
        out["peft_options"] = convert_options(out["peft_type"], options)
    return out


def arm_changes(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`TrainConfig` changes of a parsed spec: a peft arm's settings are cleared for other methods,
    so an arm can be put on any base config."""
    changes = dict(spec)
    if changes["method"] != RunMethod.PEFT:
        changes.update(peft_type=None, peft_options={})
    return changes


def canonical(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A parsed spec with each setting's value checked and normalised as a run config holds it, so that
    ``lr=2e-3`` (YAML text) and ``lr=0.002`` name the same arm.

    Raises:
        ConfigError: A value breaks its setting's rule.
    """
    fields = specs(TrainConfig)
    return {k: coerce(fields[k], v) if k in fields and k != "peft_options" else v for k, v in spec.items()}


def adapter_part(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a parsed spec that choose the adapter (not the shared settings it overrides)."""
    return {k: v for k, v in spec.items() if k in ADAPTER_SETTINGS}


def overrides(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The shared settings a parsed spec overrides (``lr``, ``batch_size``, ...)."""
    return {k: v for k, v in spec.items() if k not in ADAPTER_SETTINGS}


def slug(spec: Mapping[str, Any]) -> str:
    """A folder-name form of a parsed spec, e.g. ``more-blockrank4`` or ``peft-vera-r256``."""
    if spec["method"] != RunMethod.PEFT:
        parts = [spec["method"]] + [f"{k}{v}" for k, v in spec.items() if k != "method"]
        return "-".join(str(p).replace("/", "_").replace("_", "").replace(" ", "+") for p in parts)
    items = [
        *spec["peft_options"].items(),
        *((k, v) for k, v in spec.items() if k not in ("method", "peft_type", "peft_options")),
    ]
    parts = ["peft", spec["peft_type"], *(f"{k}{v}" for k, v in items)]
    return "-".join(re.sub(r"[^A-Za-z0-9.+]", "", str(p)) for p in parts)


def family(spec: Mapping[str, Any]) -> str:
    """What an arm's learning-rate range is keyed by: its method, or ``peft:<type>`` for a peft arm."""
    return f"peft:{spec['peft_type']}" if spec["method"] == RunMethod.PEFT else str(spec["method"])


def with_settings(spec: str, **values: Any) -> str:
    """``spec`` with ``key=value`` items added, e.g. ``with_settings("peft:vera:r=256", lr=0.01)`` ->
    ``"peft:vera:r=256,lr=0.01"`` and ``with_settings("full", lr=1e-5)`` -> ``"full:lr=1e-05"``."""
    items = ",".join(f"{k}={_float_text(v) if isinstance(v, float) else v}" for k, v in values.items())
    method, _, rest = spec.strip().partition(":")
    prefix = method
    if method.lower() == RunMethod.PEFT:
        peft_type, _, rest = rest.partition(":")
        prefix = f"{method}:{peft_type}"
    return f"{prefix}:" + ",".join(filter(None, (rest.strip(), items)))


def matches(spec: str, pattern: str) -> bool:
    """Whether an arm's spec text is selected by ``pattern``: the spec itself, its method (``more``) or its
    peft family (``peft:vera``), in any case; the spec is not parsed (its method may be unknown here)."""
    text, wanted = spec.strip().lower(), pattern.strip().lower()
    method, _, rest = text.partition(":")
    peft_family = f"peft:{rest.partition(':')[0]}" if method == RunMethod.PEFT else None
    return wanted in (text, method, peft_family)


def _float_text(value: float) -> str:
    """A float exactly as YAML reads it back as a float (``1e-05`` would be text: ``1.0e-05``)."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
