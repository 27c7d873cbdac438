"""``trainer_args``: transformers ``TrainingArguments`` options passed through a run, checked by their own types.

moreft builds a run's ``TrainingArguments`` from its settings (:func:`moreft.train.loop.training_arguments`).
Every other TrainingArguments field may be given in ``trainer_args`` (a recipe mapping, or
``--trainer-arg KEY=VALUE``), e.g. ``report_to: tensorboard``, ``optim: adafactor``,
``gradient_checkpointing: true``, ``lr_scheduler_kwargs: {min_lr: 1e-5}``. Keys are checked against
TrainingArguments' fields, and values converted as transformers' own ``HfArgumentParser`` converts
them, when the config is made; the few combinations only TrainingArguments itself checks are
reported when the run starts, before the model is loaded.

Refused keys: those moreft sets from a setting (named in :attr:`Setting.trainer_keys
<moreft.train.settings.Setting>`; the message names the setting to use instead) and
:data:`FIXED`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import json
import math
import typing
from collections.abc import Mapping
from typing import Any

from moreft.errors import ConfigError
from moreft.train.type_words import type_in_words, union_members

#: TrainingArguments fields moreft fixes for reasons of its own (no setting), with the reason.
FIXED = {
    "remove_unused_columns": "moreft's data collator needs every column it builds",
    "label_names": "moreft's tasks put their targets in 'labels'",
    "push_to_hub": "moreft never uploads (it runs offline)",
    "hub_model_id": "moreft never uploads (it runs offline)",
    "hub_strategy": "moreft never uploads (it runs offline)",
    "hub_token": "moreft never uploads (it runs offline)",
    "hub_private_repo": "moreft never uploads (it runs offline)",
    "hub_always_push": "moreft never uploads (it runs offline)",
    "hub_revision": "moreft never uploads (it runs offline)",
}
#: TrainingArguments values moreft sets that ``trainer_args`` may change.
DEFAULTS_YOU_MAY_CHANGE = ("report_to", "dataloader_num_workers", "dataloader_pin_memory", "use_cpu")


@functools.cache
def _fields() -> dict[str, tuple[Any, argparse.Action]]:
    """TrainingArguments fields: ``name -> (resolved type, HfArgumentParser's action for it)``."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)  # a bool's --no_<name> complement comes second
    hints = typing.get_type_hints(TrainingArguments)
    return {
        f.name: (hints[f.name], actions[f.name])
        for f in dataclasses.fields(TrainingArguments)
        if f.init and f.name in actions
    }


def field_names() -> list[str]:
    """Every TrainingArguments field ``trainer_args`` may name (before the refused ones)."""
    return sorted(_fields())


def check_trainer_args(name: str, value: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``trainer_args`` and convert each value to its TrainingArguments field's type.

    Args:
        name: The setting's name, for messages.
        value: The key/value pairs given.
        settings: The run config's settings by name (:func:`moreft.train.settings.specs`): their
            own names and the TrainingArguments keys they set may not be given here.

    Returns:
        Plain YAML-ready values (enums as their values), in the given order.

    Raises:
        ConfigError: A key that is no TrainingArguments field (close names suggested), one moreft
            sets itself (the message names the setting to use), or a value of the wrong type.
    """
    owners = {key: spec.name for spec in settings.values() for key in spec.trainer_keys}
    fields = _fields()
    out = {}
    for key, raw in value.items():
        if key in owners or key in settings:
            spec = settings[owners.get(key, key)]
            how = "a moreft setting" if key in settings else f"set by moreft's {spec.name} setting"
            raise ConfigError(
                f"{name} key {key!r} is {how}; give it as {spec.option} (recipe key "
                f"{spec.name}) instead of in {name}"
            )
        if key in FIXED:
            raise ConfigError(f"{name} key {key!r} cannot be changed: {FIXED[key]}")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = (
                f"; did you mean {' or '.join(map(repr, close))}?"
                if close
                else (" (the fields of transformers.TrainingArguments are accepted)")
            )
            raise ConfigError(f"{name} key {key!r} is not a transformers TrainingArguments field{hint}")
        out[key] = _convert(f"{name} {key}", raw, *fields[key])
    if "report_to" in out:
        check_reporting(out["report_to"], installed=False)
    return out


def _convert(what: str, value: Any, hint: Any, action: argparse.Action) -> Any:
    """``value`` as TrainingArguments takes it: transformers' own argument type converts each item."""
    kinds = {typing.get_origin(t) or t for t in union_members(hint)}
    if value is None:
        if type(None) in kinds or action.default is None:
            return None
        raise ConfigError(f"{what}=None: this option cannot be null (type {type_in_words(hint)})")
    if isinstance(value, str) and dict in kinds and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{what}={value!r} is not a valid JSON object: {exc}") from None
    if isinstance(value, Mapping):
        if dict not in kinds:
            raise ConfigError(f"{what}={value!r} must be {type_in_words(hint)}, not a mapping")
        try:
            return json.loads(json.dumps(dict(value), allow_nan=False))  # plain, YAML-ready values
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"{what}={value!r} must be a mapping of JSON values ({exc})") from None
    many = list in kinds or action.nargs in ("+", "*")
    if isinstance(value, str) and many and "," in value:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        if not many:
            raise ConfigError(f"{what}={value!r} takes one value, not a list")
        return [_one(what, v, hint, action) for v in value]
    return _one(what, value, hint, action)


def _one(what: str, value: Any, hint: Any, action: argparse.Action) -> Any:
    if isinstance(value, (Mapping, list, tuple)) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{what}={value!r} must be {type_in_words(hint)}")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    convert = action.type or str
    try:
        out = convert(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"{what}={value!r} must be {type_in_words(hint)}") from None
    if action.choices is not None and out not in action.choices:
        by_case = {str(c).lower(): c for c in action.choices}
        if str(out).lower() not in by_case:
            close = difflib.get_close_matches(str(out), [str(c) for c in action.choices], n=3)
            hint_text = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{what}={value!r} is not one of {[str(c) for c in action.choices]}{hint_text}")
        out = by_case[str(out).lower()]
    return out.value if isinstance(out, enum.Enum) else out


def check_reporting(report_to: Any, installed: bool = True) -> None:
    """Refuse ``report_to`` integrations transformers does not know (or, with ``installed``, whose
    package is missing: checked when a run starts, so a saved config stays readable elsewhere).

    Raises:
        ConfigError: names the integration, and the ones known or installed.
    """
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for integration in names:
        if integration in ("none", "all"):
            continue
        if integration not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(str(integration), list(INTEGRATION_TO_CALLBACK), n=2)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"trainer_args report_to={integration!r} is not one of transformers' integrations "
                f"{sorted(INTEGRATION_TO_CALLBACK)} (or 'none', 'all'){hint}"
            )
        if installed and integration not in get_available_reporting_integrations():
            raise ConfigError(
                f"trainer_args report_to={integration!r} needs its package, which is not installed "
                f"(e.g. `pip install {integration}`); installed integrations: "
                f"{get_available_reporting_integrations() or 'none'}"
            )


def check_scheduler(arguments: Any) -> None:
    """Build the run's learning-rate schedule once on a stand-in optimizer, so that a schedule missing
    its options (``cosine_with_min_lr`` needs ``lr_scheduler_kwargs: {min_lr: ...}``) fails now.

    Raises:
        ConfigError: names the schedule and transformers' complaint.
    """
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=arguments.learning_rate)
    steps = arguments.max_steps if arguments.max_steps > 0 else 100
    try:
        get_scheduler(
            arguments.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=arguments.get_warmup_steps(steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=arguments.lr_scheduler_kwargs or {},
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"lr_scheduler={arguments.lr_scheduler_type.value!r} cannot be built with "
            f"lr_scheduler_kwargs={arguments.lr_scheduler_kwargs or {}} ({type(exc).__name__}: "
            f"{exc}); pass its options with --trainer-arg lr_scheduler_kwargs=..."
        ) from None
