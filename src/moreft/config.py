"""Typed, frozen, validated adapter configurations.

A config says *what* to build (method hyperparameters and which modules to adapt); layer
shapes are only known at injection time, so rules that depend on them (``nblocks <= in``,
TRUNCATION's ``r_hat <= min(in, out)``) are checked by the layers, not here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import regex

from .errors import ConfigError

ALL_LINEAR = "all-linear"
#: A ``target_modules`` regex longer than this is refused (names are better listed).
MAX_PATTERN_CHARS = 1000


class Method(str, enum.Enum):
    """The adapter families moreft implements."""

    MORE = "more"
    MORA = "mora"
    LORA = "lora"


class MoRAOperator(str, enum.Enum):
    """MoRA's parameter-free compress/decompress pairs (MoRA paper, Section 4)."""

    TRUNCATION = "truncation"  # Eq. 4-5: keep the first r_hat inputs, write the first r_hat outputs
    SHARING = "sharing"  # Eq. 6-7: groups of inputs summed, groups of outputs share a row of M
    DECOUPLE = "decouple"  # Eq. 8: input cut into r_hat-chunks, each multiplied by M
    ROTATION = "rotation"  # Eq. 9-11: DECOUPLE with a RoPE-style rotation of chunk i


class SharingLayout(str, enum.Enum):
    """How SHARING groups inputs and outputs; ReMoRA alternates between the two.

    STRIDED groups ``{i, i + r_hat, i + 2 r_hat, ...}`` (the authors' fine-tuning default, their
    ``mora_type=1``: tile on decompress). ADJACENT groups runs of neighbours (their ``mora_type=2``:
    ``repeat_interleave`` on decompress; uneven sizes when ``r_hat`` does not divide the width).
    """

    STRIDED = "strided"
    ADJACENT = "adjacent"


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
            raise ConfigError(f"target_modules is a regex of {len(value):,} characters; at most "
                              f"{MAX_PATTERN_CHARS:,} are accepted (list the names instead)")
        try:
            regex.compile(value)
        except (regex.error, RecursionError, OverflowError) as exc:
            raise ConfigError(f"target_modules={value!r} is not a valid regular expression: {exc}") from None
        return value
    names = _names("target_modules", value)
    if not names:
        raise ConfigError("target_modules=[] selects nothing; give names, a regex, 'all-linear' or None")
    return names


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every method shares.

    Attributes:
        target_modules: module names to adapt: a list (exact qualified name or dotted suffix,
            e.g. ``"query"``), a regex string (full match on the qualified name), ``"all-linear"``
            (every linear layer but the output head), or None for the model family's default.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a
            classifier head), matched like ``target_modules`` lists.
        dropout: dropout probability inside the adapter branch (0 disables it).
    """

    method: ClassVar[Method]
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _targets(self.target_modules))
        object.__setattr__(self, "modules_to_save", _names("modules_to_save", self.modules_to_save))
        object.__setattr__(self, "dropout", _probability("dropout", self.dropout))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :func:`config_from_dict` turns back into an equal config."""
        out: dict[str, Any] = {"method": self.method.value}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else (
                list(value) if isinstance(value, tuple) else value)
        return out


@dataclass(frozen=True, kw_only=True)
class MoReConfig(AdapterConfig):
    """MoRe: ΔW = P1·blkdiag2·P2·blkdiag1 with ``nblocks`` blocks of rank ``block_rank``; no alpha.

    About ``block_rank * (in + out)`` parameters per layer, rank up to ``nblocks * block_rank``.
    """

    method: ClassVar[Method] = Method.MORE
    nblocks: int = 4
    block_rank: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("nblocks", self.nblocks)
        positive_int("block_rank", self.block_rank)


@dataclass(frozen=True, kw_only=True)
class MoRAConfig(AdapterConfig):
    """MoRA: one square ``r_hat x r_hat`` matrix between parameter-free compress/decompress.

    ``r_hat`` defaults to ``floor(sqrt((in + out) * rank))`` per layer (LoRA-rank-``rank``
    parameter parity), rounded down to even for ROTATION and capped at ``min(in, out)`` for
    TRUNCATION and SHARING. An explicit ``r_hat`` is used as given and checked per layer.
    """

    method: ClassVar[Method] = Method.MORA
    rank: int = 8
    r_hat: int | None = None
    operator: MoRAOperator = MoRAOperator.ROTATION
    sharing_layout: SharingLayout = SharingLayout.STRIDED

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("rank", self.rank)
        if self.r_hat is not None:
            positive_int("r_hat", self.r_hat)
        object.__setattr__(self, "operator", coerce_enum(MoRAOperator, self.operator, "operator"))
        object.__setattr__(self, "sharing_layout",
                           coerce_enum(SharingLayout, self.sharing_layout, "sharing_layout"))
        if self.operator is MoRAOperator.ROTATION and self.r_hat is not None and self.r_hat % 2:
            raise ConfigError(f"r_hat={self.r_hat} must be even for operator 'rotation' "
                              "(it rotates pairs of coordinates)")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA: ΔW = (alpha / rank) · B·A with A Kaiming-initialised and B zero."""

    method: ClassVar[Method] = Method.LORA
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("rank", self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha={self.alpha!r} must be a number > 0 and finite")
        object.__setattr__(self, "alpha", float(self.alpha))


CONFIG_CLASSES: dict[Method, type[AdapterConfig]] = {
    Method.MORE: MoReConfig, Method.MORA: MoRAConfig, Method.LORA: LoRAConfig}


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Build a config from :meth:`AdapterConfig.to_dict` output (e.g. a saved adapter's JSON).

    Raises:
        ConfigError: unknown method, unknown keys, or invalid values.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"an adapter config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    method = coerce_enum(Method, data.pop("method", None), "method")
    cls = CONFIG_CLASSES[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} for method {method.value!r}; valid keys: {sorted(known)}")
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = tuple(data["target_modules"])
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"bad {method.value} config: {exc}") from None
