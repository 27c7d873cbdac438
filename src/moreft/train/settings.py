"""One declaration per run setting; everything else about it is derived from that declaration.

Each :class:`~moreft.train.config.TrainConfig` field carries a :class:`Setting` in its metadata
(built with :func:`setting`, or :func:`adapter_setting` for the adapter's own hyperparameters,
which take their default, choices and help from :mod:`moreft.config`). From those declarations
come: value checking (:func:`coerce`), the recipe keys, the ``moreft train`` / ``compare`` /
``search`` flags (:mod:`moreft.train.flags`), the adapter config a run injects and its label,
compare's adapter keys, the fields ``moreft search`` sets per trial, the fields a resumed run may
change, the TrainingArguments keys moreft controls (:mod:`moreft.train.trainer_args`) and the
table in ``docs/settings.md`` (:func:`settings_markdown`). A new setting is one new field.

Choices are enums, matched in any case and stored as the member's value (``"MORE"`` -> ``"more"``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moreft.config import CONFIG_CLASSES, Method, coerce_enum
from moreft.errors import ConfigError
from moreft.train.value_checks import check_float, check_int, check_targets

#: The key of a field's :class:`Setting` in ``dataclasses.Field.metadata``.
SETTING = "moreft_setting"
#: Largest integer any setting takes unless it says otherwise (C code takes int64).
INT_MAX = 2**62


class Group(str, enum.Enum):
    """What a setting is about (the sections of docs/settings.md)."""

    ADAPTER = "adapter"  # the method and its config (moreft.config): what is trained
    DATA = "data"  # the task, model and examples
    TRAINING = "training"  # how it is optimised
    RUN = "run"  # bookkeeping: where the run writes, how often it evaluates, logs and checkpoints


class Kind(str, enum.Enum):
    """A setting's value type, derived from the field's annotation (and ``choices``)."""

    BOOL = "true/false"
    INT = "integer"
    FLOAT = "number"
    TEXT = "text"
    CHOICE = "choice"
    NAMES = "module names or regex"
    MAPPING = "mapping"


@dataclass(frozen=True, kw_only=True)
class Setting:
    """The declaration of one run setting.

    Attributes:
        help: What it means, in plain words (shown by ``--help`` and in docs/settings.md).
        group: What it is about.
        minimum: Smallest value of a number (``above``: the value must exceed it).
        maximum: Largest value of a number (``below``: the value must stay under it).
        choices: The enum whose values it takes (matched in any case, stored as the value).
        resumable: May differ when a run is resumed (it does not change what was learned so far).
        searched: ``moreft search`` sets it for each trial, so search has no flag for it.
        primary: Always shown in the method label (e.g. ``more:block_rank=4``); the method's other
            settings are shown when they differ from their default.
        methods: Adapter settings: the methods whose config has it (empty: every method).
        trainer_keys: ``transformers.TrainingArguments`` fields moreft sets from this setting
            (so ``trainer_args`` may not set them).
        flag: Mapping settings: the repeatable ``--flag KEY=VALUE`` that adds one entry.
        parse: Mapping settings: checks and normalises the whole mapping.
        name, kind, optional, required, default: Filled in from the field by :func:`specs`.
    """

    help: str
    group: Group
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    below: bool = False
    choices: type[enum.Enum] | None = None
    resumable: bool = False
    searched: bool = False
    primary: bool = False
    methods: tuple[Method, ...] = ()
    trainer_keys: tuple[str, ...] = ()
    flag: str | None = None
    parse: Callable[[str, Any], Any] | None = None
    name: str = ""
    kind: Kind = Kind.TEXT
    optional: bool = False
    required: bool = False
    default: Any = None

    @property
    def option(self) -> str:
        """The command-line flag, e.g. ``--block-rank`` (``--task-option`` for ``task_options``)."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def rule(self) -> str:
        """The rule a value must follow, in words, e.g. ``integer >= 1``."""
        if self.kind is Kind.CHOICE:
            rule = "one of " + ", ".join(str(m.value) for m in self.choices)
        elif self.kind in (Kind.INT, Kind.FLOAT):
            parts = []
            if self.minimum is not None:
                parts.append(f"{'>' if self.above else '>='} {self.minimum}")
            if self.maximum is not None:
                parts.append(f"{'<' if self.below else '<='} {self.maximum}")
            rule = f"{self.kind.value} " + " and ".join(parts) if parts else f"finite {self.kind.value}"
        elif self.kind is Kind.NAMES:
            rule = "names (space- or comma-separated), one regex, or all-linear"
        elif self.kind is Kind.MAPPING:
            rule = "mapping of KEY: VALUE"
        elif self.kind is Kind.TEXT:
            rule = "non-empty text"
        else:
            rule = "true or false"
        return rule + (", or none" if self.optional and self.kind is not Kind.NAMES else "")

    @property
    def default_text(self) -> str:
        """The default as a user writes it (``none`` for None, ``{}`` for an empty mapping)."""
        if self.required:
            return "(required)"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return str(self.default)


def setting(default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field declared by a :class:`Setting` (``spec`` are its attributes).

    A mutable default (a dict) becomes a ``default_factory``.
    """
    meta = {SETTING: Setting(**spec)}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def adapter_setting(name: str, **spec: Any) -> Any:
    """A field for the adapter hyperparameter ``name`` of :mod:`moreft.config`'s adapter configs.

    The default, the choices (the field's enum) and the help come from the configs that have the
    field (help prefixed with the method when only some methods have it); ``spec`` adds the rule
    and may override the help.

    Raises:
        TypeError: No adapter config has ``name``, or two disagree on its default or type.
    """
    found = {}
    for method, cls in CONFIG_CLASSES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name in fields:
            found[method] = (fields[name], typing.get_type_hints(cls)[name])
    if not found:
        raise TypeError(f"no adapter config has a field {name!r}")
    defaults = {_plain(_default(f)) for f, _ in found.values()}
    kinds = {hint for _, hint in found.values()}
    if len(kinds) != 1:
        raise TypeError(f"adapter configs disagree on the type of {name!r}: {kinds}")
    if len(defaults) != 1:  # e.g. alpha: LoRA 16, MoRe 1; none in the run config means "the method's own"
        own = ", ".join(f"{_LABELS.get(m, m.value)} {_plain(_default(f))}" for m, (f, _) in found.items())
        defaults = {None}
        spec["help_suffix"] = f" None: each method's own default ({own})."
    common = len(found) == len(CONFIG_CLASSES)
    suffix = spec.pop("help_suffix", "")
    if "help" not in spec:
        helps = {method: f.metadata.get("help", "") for method, (f, _) in found.items()}
        spec["help"] = (
            next(iter(helps.values()))
            if common
            else " ".join(f"{_LABELS.get(method, method.value)}: {text}" for method, text in helps.items())
        )
    spec["help"] += suffix
    enums = [t for t in _union_args(kinds.pop()) if isinstance(t, type) and issubclass(t, enum.Enum)]
    if enums:
        spec.setdefault("choices", enums[0])
    return setting(
        defaults.pop(), group=spec.pop("group", Group.ADAPTER), methods=() if common else tuple(found), **spec
    )


_LABELS = {Method.MORE: "MoRe", Method.MORA: "MoRA", Method.LORA: "LoRA"}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any) -> Any:
    """An enum member as its value (what a TrainConfig stores)."""
    return value.value if isinstance(value, enum.Enum) else value


def _union_args(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _kind(hint: Any, spec: Setting) -> tuple[Kind, bool]:
    """``(kind, optional)`` of a field from its resolved annotation."""
    args = _union_args(hint)
    optional = type(None) in args
    origins = {typing.get_origin(a) or a for a in args if a is not type(None)}
    if spec.choices is not None:
        return Kind.CHOICE, optional
    if tuple in origins:
        return Kind.NAMES, optional
    if dict in origins:
        return Kind.MAPPING, optional
    for kind, py in ((Kind.BOOL, bool), (Kind.INT, int), (Kind.FLOAT, float), (Kind.TEXT, str)):
        if origins == {py}:
            return kind, optional
    raise TypeError(f"setting {spec.name!r} has an annotation moreft cannot check: {hint}")


@functools.cache
def specs(cls: type) -> dict[str, Setting]:
    """Every field's completed :class:`Setting` by name, in declaration order.

    Raises:
        TypeError: A field has no :class:`Setting` (every setting must be declared).
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(SETTING)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no Setting; declare it with setting(...)")
        spec = dataclasses.replace(spec, name=f.name)
        kind, optional = _kind(hints[f.name], spec)
        default = _default(f)
        out[f.name] = dataclasses.replace(
            spec,
            kind=kind,
            optional=optional,
            required=default is dataclasses.MISSING,
            default=None if default is dataclasses.MISSING else default,
        )
    return out


def coerce(spec: Setting, value: Any) -> Any:
    """Check and normalise one value of a setting (YAML gives ``3e-4`` as a string; that is accepted).

    Raises:
        ConfigError: The value has the wrong type or breaks the setting's rule (the message names
            the setting, the value and the rule).
    """
    name = spec.name
    if spec.kind is Kind.NAMES:
        return check_targets(name, value)
    if value is None and spec.optional:
        return None
    if spec.kind is Kind.TEXT:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name}={value!r} must be a non-empty string")
        return value
    if spec.kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if spec.kind is Kind.CHOICE:
        return coerce_enum(spec.choices, value, name).value
    if spec.kind is Kind.MAPPING:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}={value!r} must be a mapping of option name to value")
        return spec.parse(name, dict(value)) if spec.parse else dict(value)
    if spec.kind is Kind.INT:
        return check_int(name, value, spec.minimum, INT_MAX if spec.maximum is None else spec.maximum)
    return check_float(name, value, spec.minimum, spec.maximum, above=spec.above, below=spec.below)


def canonical_choice(spec: Setting, text: str) -> str:
    """The stored value of the choice ``text`` names in any case; ``text`` itself when it names none."""
    try:
        return coerce_enum(spec.choices, text, spec.name).value
    except ConfigError:
        return text


def settings_markdown(cls: type, fixed: Mapping[str, str]) -> str:
    """docs/settings.md: every setting of ``cls`` by group, with its flag, type, default, rule and meaning,
    then the TrainingArguments keys ``trainer_args`` may not set: those a setting sets, and ``fixed``
    (key -> why moreft fixes it)."""

    all_specs = specs(cls)
    lines = [
        "# Run settings",
        "",
        (
            "<!-- Generated from the declarations in src/moreft/train/config.py by "
            "`python -m moreft.train.settings_doc docs/settings.md`; do not edit by hand. -->"
        ),
        "",
        (
            "Every `moreft train` setting is a recipe key (YAML) and a command-line flag. Flags override the "
            "recipe, which overrides the defaults; each flag may be given once. Choices are accepted in any "
            "case and stored as listed. `none` on the command line clears an optional setting (`null` in "
            "YAML). *resumable*: may change when a run is continued with `--resume`. *per trial*: `moreft "
            "search` sets it for each trial (search has no flag for it)."
        ),
        "",
    ]
    for group in Group:
        members = [s for s in all_specs.values() if s.group is group]
        if not members:
            continue
        lines += [
            f"## {group.value.capitalize()}",
            "",
            "| setting | flag | type | default | rule | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for s in members:
            flag = (
                f"`{s.option} KEY=VALUE` (repeatable)"
                if s.kind is Kind.MAPPING
                else (f"`{s.option}` / `--no-{s.option[2:]}`" if s.kind is Kind.BOOL else f"`{s.option}`")
            )
            notes = [w for w, on in (("resumable", s.resumable), ("per trial", s.searched)) if on]
            meaning = _markdown_text(s.help) + (f" *({'; '.join(notes)})*" if notes else "")
            lines.append(
                f"| `{s.name}` | {flag} | {s.kind.value} | `{s.default_text}` | {_markdown_text(s.rule)} | "
                f"{meaning} |"
            )
        lines.append("")
    owned = {key: s for s in all_specs.values() for key in s.trainer_keys}
    lines += [
        "## transformers' TrainingArguments",
        "",
        (
            "`trainer_args` passes any other field of `transformers.TrainingArguments` through, converted by "
            "its own type (e.g. `--trainer-arg report_to=tensorboard --trainer-arg optim=adafactor`). "
            "These fields are moreft's to set:"
        ),
        "",
        "| TrainingArguments field | set by |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | `{s.name}` (`{s.option}`) |" for key, s in sorted(owned.items())]
    lines += [f"| `{key}` | fixed: {reason} |" for key, reason in sorted(fixed.items())]
    return "\n".join(lines) + "\n"


def _markdown_text(text: str) -> str:
    """``text`` safe in a Markdown table cell (``<task>`` is not an HTML tag, ``|`` not a column)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
