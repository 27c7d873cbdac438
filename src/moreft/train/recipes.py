"""Recipes: YAML files of :class:`TrainConfig` values, with placeholders for user-supplied paths.

A recipe is a mapping of ``TrainConfig`` fields plus two optional keys of its own:

* ``description``: one line saying what the recipe reproduces;
* ``requires``: ``{VARIABLE: what to supply}`` for values the user must provide (a model
  directory, a data folder). Values may then contain ``${VARIABLE}``, filled from the environment.

An unset variable is an error that says what to supply, unless a command-line flag replaced the
value that needed it (``--model /path``). Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moreft.errors import ConfigError
from moreft.train.bounded import load_yaml, read_text_file
from moreft.train.config import TrainConfig, field_names

RECIPE_ONLY_KEYS = ("description", "requires")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a recipe file (keys only; values are checked by :class:`TrainConfig`).

    Returns:
        The recipe mapping, including ``description`` / ``requires`` if present.

    Raises:
        ConfigError: The file is missing, too large, not UTF-8, not YAML (or YAML whose aliases expand
            past :data:`moreft.train.bounded.MAX_YAML_NODES`), not a mapping, or has unknown keys (the
            message names them and lists the valid keys).
    """
    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f"; recipes in {path.parent}: {near}" if near else ""
        raise ConfigError(f"recipe {str(path)!r} does not exist{hint}")
    data = load_yaml(read_text_file(path, "recipe"), f"recipe {str(path)!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of key: value, got {type(data).__name__}")
    unknown = sorted(set(data) - set(field_names()) - set(RECIPE_ONLY_KEYS))
    if unknown:
        raise ConfigError(
            f"recipe {str(path)!r} has unknown key(s) {unknown}; valid keys are "
            f"{field_names() + list(RECIPE_ONLY_KEYS)}"
        )
    requires = data.get("requires") or {}
    if not isinstance(requires, dict) or not all(isinstance(k, str) for k in requires):
        raise ConfigError(f"'requires' in recipe {str(path)!r} must map VARIABLE names to descriptions")
    return data


def _placeholders(value: Any, key: str) -> list[tuple[str, str]]:
    """``(variable, key)`` for every ``${VAR}`` in a value (strings inside lists / dicts too)."""
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _placeholders(v, f"{key}.{k}")]
    if isinstance(value, list):
        return [found for v in value for found in _placeholders(v, key)]
    return [(name, key) for name in _PLACEHOLDER.findall(value)] if isinstance(value, str) else []


def _flag(key: str) -> str:
    """The command-line flag that replaces the value at ``key``."""
    if key.startswith("task_options."):
        return f"--task-option {key.split('.', 1)[1]}=..."
    return f"--{key.replace('_', '-')}"


def _check_placeholders(
    data: Mapping[str, Any], requires: Mapping[str, Any], source: str, env: Mapping[str, str]
) -> None:
    """Raise one error naming every unset variable, what it should hold and the flags that replace it."""
    missing: dict[str, list[str]] = {}
    for name, key in (found for k, v in data.items() for found in _placeholders(v, k)):
        if not env.get(name):
            missing.setdefault(name, []).append(key)
    if missing:
        needs = "; ".join(f"{name}: {requires.get(name) or 'a value'}" for name in missing)
        flags = sorted({_flag(key) for keys in missing.values() for key in keys})
        first = next(iter(missing))
        raise ConfigError(
            f"{source} needs {needs}. Set {'it' if len(missing) == 1 else 'them'} in the environment "
            f"(e.g. `export {first}=/path/to/it`) or pass {', '.join(flags)}; moreft never "
            "downloads models or data"
        )


def _fill(value: Any, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` in a string (or inside lists / dicts) from ``env`` (checked to be set)."""
    if isinstance(value, dict):
        return {k: _fill(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, env) for v in value]
    return _PLACEHOLDER.sub(lambda m: env[m.group(1)], value) if isinstance(value, str) else value


def resolve_config(
    recipe: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Defaults < recipe < overrides, placeholders filled, validated.

    Args:
        recipe: Path of a recipe YAML file, or None.
        overrides: Field values that win over the recipe (e.g. command-line flags); ``task_options``
            given here are merged into the recipe's rather than replacing them.
        env: Where ``${VAR}`` values come from (default ``os.environ``).

    Returns:
        The resolved :class:`TrainConfig`.

    Raises:
        ConfigError: Bad recipe (see :func:`read_recipe`), an unset required variable, unknown
            override keys, or an invalid value.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    requires: dict[str, Any] = {}
    source = "this run"
    if recipe is not None:
        data = read_recipe(recipe)
        requires = dict(data.pop("requires", None) or {})
        data.pop("description", None)
        source = f"recipe {str(recipe)!r}"
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {field_names()}")
    if overrides.get("task") not in (None, data.get("task")):
        data.pop("task_options", None)  # the recipe's options were for another task
    for name in mapping_settings():  # a flag's KEY=VALUE adds to the recipe's mapping, key by key
        if name in overrides and isinstance(data.get(name), dict) and isinstance(overrides[name], dict):
            overrides[name] = {**data[name], **overrides[name]}
    data.update(overrides)
    _check_placeholders(data, requires, source, env)
    data = {k: _fill(v, env) for k, v in data.items()}
    return TrainConfig.from_dict(data)


def mapping_settings() -> list[str]:
    """Settings that are mappings (``task_options``, ``trainer_args``)."""
    from moreft.train.settings import Kind, specs

    return [s.name for s in specs(TrainConfig).values() if s.kind is Kind.MAPPING]


def parse_key_values(items: list[str] | None, what: str = "task option") -> dict[str, Any]:
    """Parse ``["source=tweets", "num_pairs=100"]`` into ``{"source": "tweets", "num_pairs": 100}``.

    Values are read as YAML (numbers and booleans get their types; text that is not YAML stays text).

    Raises:
        ConfigError: An item is not ``key=value``, or names a key given before.
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{what} {item!r} must look like key=value (e.g. "
                f"{'source=tweets' if what == 'task option' else 'KEY=VALUE'})"
            )
        if key in given:
            raise ConfigError(f"{what} {key!r} is given twice ({given[key]!r}, then {item!r}); give it once")
        given[key] = item
        try:
            out[key] = load_yaml(raw, f"{what} {item!r}") if raw.strip() else ""
        except ConfigError:
            out[key] = raw
    return out


def parse_task_options(items: list[str] | None) -> dict[str, Any]:
    """``--task-option`` items as a mapping (see :func:`parse_key_values`)."""
    return parse_key_values(items, "task option")


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text, fields in declaration order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)
