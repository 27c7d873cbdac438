"""Command-line flags derived from the setting declarations, and flags that may be given only once.

:func:`add_setting_flags` adds one ``--flag`` per :class:`~moreft.train.config.TrainConfig` field
(type, choices, help, default shown, all from its :class:`~moreft.train.settings.Setting`); a
flag left out does not override the recipe. Mappings take repeatable ``--task-option KEY=VALUE``
/ ``--trainer-arg KEY=VALUE`` flags. :func:`overrides` turns the parsed flags back into setting
values.

argparse keeps the last of a repeated flag without a word (``--lr 1 --lr 2`` trains at 2);
:class:`StoreOnce` and :class:`BooleanOnce` refuse the repeat instead, naming the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from moreft.train.settings import Kind, Setting, canonical_choice, specs

#: Values of an optional number or choice flag that mean "none" (e.g. ``--max-steps none`` undoes a recipe's).
NONE_WORDS = ("none", "null")
#: Where the actions record which flags this parse has seen (one set per parse, on its namespace).
_SEEN = "_moreft_flags_seen"


def _refuse_repeat(action: argparse.Action, namespace: argparse.Namespace, option: str | None) -> None:
    seen = namespace.__dict__.setdefault(_SEEN, {})
    if action.dest in seen:
        raise argparse.ArgumentError(
            action, f"given twice ({seen[action.dest]}, then {option}); give it once"
        )
    seen[action.dest] = option


class StoreOnce(argparse.Action):
    """``store``, but a second occurrence of the flag is an error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string is not None:
            _refuse_repeat(self, namespace, f"{option_string} {_shown(values)}")
        setattr(namespace, self.dest, values)


class BooleanOnce(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``, but giving either twice (or both) is an error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        _refuse_repeat(self, namespace, option_string)
        super().__call__(parser, namespace, values, option_string)


def _shown(values: Any) -> str:
    return " ".join(map(str, values)) if isinstance(values, list) else str(values)


def register_once(parser: argparse.ArgumentParser) -> None:
    """Make ``store`` (the default action) of ``parser``, its groups and subparsers refuse repeats."""
    parser.register("action", None, StoreOnce)
    parser.register("action", "store", StoreOnce)


def _number(convert: Callable[[str], Any], name: str, optional: bool) -> Callable[[str], Any]:
    """``convert``, also taking ``none`` when the setting is optional; named as argparse's messages show it."""

    def parse(text: str) -> Any:
        return None if optional and text.strip().lower() in NONE_WORDS else convert(text)

    parse.__name__ = name  # argparse: "invalid int value: 'ten'"
    return parse


def _choice(spec: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if spec.optional and text.strip().lower() in NONE_WORDS:
            return None
        return canonical_choice(spec, text)

    parse.__name__ = "choice"
    return parse


def flag_help(spec: Setting) -> str:
    """``--help`` text: the meaning, then the rule and the default."""
    if spec.kind is Kind.MAPPING:
        extra = "repeatable; KEY=VALUE, VALUE read as YAML"
    else:
        extra = f"{spec.rule}; default {spec.default_text}"
    return f"{spec.help} [{extra}]".replace("%", "%%")


def add_setting_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per setting of ``cls`` (but ``skip``); none has a default, so unset flags change nothing."""
    for spec in specs(cls).values():
        if spec.name in skip:
            continue
        kw: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": flag_help(spec)}
        if spec.kind is Kind.MAPPING:
            kw.update(action="append", metavar="KEY=VALUE")
        elif spec.kind is Kind.BOOL:
            kw["action"] = BooleanOnce
        elif spec.kind is Kind.NAMES:
            kw.update(action=StoreOnce, nargs="+", metavar="NAME")
        elif spec.kind is Kind.CHOICE:
            values = [str(m.value) for m in spec.choices]
            shown = values + (["none"] if spec.optional else [])
            kw.update(
                action=StoreOnce,
                type=_choice(spec),
                choices=values + ([None] if spec.optional else []),
                metavar="{" + ",".join(shown) + "}" if len(shown) <= 6 else spec.name.upper(),
            )
        else:
            convert = {Kind.INT: int, Kind.FLOAT: str, Kind.TEXT: str}[
                spec.kind
            ]  # numbers: checked by coerce
            kw.update(
                action=StoreOnce,
                type=_number(convert, convert.__name__, spec.optional),
                metavar=spec.name.upper(),
            )
        parser.add_argument(spec.option, **kw)


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The setting values the parsed flags give (mappings parsed from their ``KEY=VALUE`` items).

    Raises:
        ConfigError: A malformed or repeated ``KEY=VALUE`` item.
    """
    from moreft.train.recipes import parse_key_values

    out = {}
    for name, spec in specs(cls).items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if spec.kind is Kind.MAPPING:
            value = parse_key_values(value, spec.option[2:].replace("-", " "))
        elif spec.kind is Kind.NAMES:
            value = value[0] if len(value) == 1 else list(value)
        out[name] = value
    return out
