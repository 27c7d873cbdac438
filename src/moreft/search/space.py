"""What ``moreft search`` samples: the method, its architecture, the modules to adapt, lr and batch size.

Defaults follow the MoRe paper (Section 3.1, Appendices B and C): learning rate log-uniform in
``[1e-4, 6.6e-4]`` and batch size in ``{16, 32}`` (their GLUE ranges, found with ASHA), MoRe with
``nblocks = 4`` and ``block_rank`` in ``{1, 2, 4, 8}``; square blocks (``block_rank`` equal to the
block size, trading ``nblocks`` for parameters as in their Figure 2) and the other methods are
opt-in. A space is read from the ``space:`` mapping of a search YAML file::

    space:
      methods: [more, lora, mora]
      arms: [peft:vera:r=256, peft:boft:boft_block_size=4]   # any method spec, peft methods too
      lr: {low: 1e-4, high: 6.6e-4, log: true}
      lr_by_method:                             # an arm's range: its peft:<type>, then its method, then lr
        more: {low: 1e-4, high: 3e-2}
        peft:vera: {low: 1e-3, high: 1e-1}
      batch_size: [16, 32]
      target_modules: [default, all-linear]     # "default": the run config's / model's choice
      more: {nblocks: [4], block_rank: [1, 2, 4, 8], block_shape: [rectangular, square],
             square_nblocks: [16, 32, 64]}
      lora: {rank: [4, 8, 16], alpha_per_rank: 2}
      mora: {rank: [4, 8], operator: [rotation, sharing]}

``arms`` without ``methods`` searches those arms only. MoRe has no ``alpha``, so its best learning
rate differs from LoRA's: ``lr_by_method`` gives each method (or peft type) its own range, and the
report warns when a method's best rate lies in the outer tenth of its range (widen it).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moreft.config import MoRAOperator, coerce_enum, positive_int
from moreft.errors import ConfigError
from moreft.search.lr_ranges import ON, FloatRange, family_key, family_of
from moreft.train.arms import adapter_part, arm_changes, overrides, parse_method_spec
from moreft.train.choices import METHODS

#: ``target_modules`` choice that keeps the run config's value (None: the model's default targets).
DEFAULT_TARGETS = "default"
#: ``block_rank`` placeholder of square MoRe blocks (the block size, known once the model is).
SQUARE = "square"


class BlockShape(str, enum.Enum):
    """MoRe block shapes: ``rectangular`` (``block_rank`` searched) or ``square`` (= the block size)."""

    RECTANGULAR = "rectangular"
    SQUARE = "square"


def _choices(name: str, value: Any, kind: type, check: Callable[[str, Any], Any] | None = None) -> tuple:
    """A non-empty tuple of distinct ``kind`` values (a scalar is a one-element list).

    Raises:
        ConfigError: empty, repeated, or wrongly typed entries.
    """
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise ConfigError(f"search space {name}=[] is empty; give at least one choice")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ConfigError(f"search space {name}={list(values)!r}: {v!r} is not a {kind.__name__}")
        if check is not None:
            check(name, v)
    if len(set(values)) != len(values):
        raise ConfigError(f"search space {name}={list(values)!r} repeats a choice")
    return values


def _from_mapping(cls: type, name: str, data: Any) -> Any:
    """Build a space dataclass from a mapping, naming unknown keys.

    Raises:
        ConfigError: ``data`` is not a mapping or has unknown keys.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"search space {name!r} must be a mapping, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"search space {name!r} has unknown key(s) {unknown}; valid keys are {known}")
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class MoReSpace:
    """MoRe choices. ``square_nblocks`` is used for square blocks, ``nblocks`` / ``block_rank`` otherwise."""

    nblocks: tuple[int, ...] = (4,)
    block_rank: tuple[int, ...] = (1, 2, 4, 8)
    block_shape: tuple[BlockShape, ...] = (BlockShape.RECTANGULAR,)
    square_nblocks: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        for name in ("nblocks", "block_rank", "square_nblocks"):
            object.__setattr__(self, name, _choices(f"more.{name}", getattr(self, name), int, positive_int))
        shapes = _choices("more.block_shape", self.block_shape, str)
        object.__setattr__(
            self, "block_shape", tuple(coerce_enum(BlockShape, s, "more.block_shape") for s in shapes)
        )


@dataclass(frozen=True, kw_only=True)
class LoRASpace:
    """LoRA choices; ``alpha = alpha_per_rank * rank`` (2: alpha 16 at rank 8); None keeps the run's alpha."""

    rank: tuple[int, ...] = (4, 8, 16)
    alpha_per_rank: float | None = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", _choices("lora.rank", self.rank, int, positive_int))
        a = self.alpha_per_rank
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or a <= 0):
            raise ConfigError(f"search space lora.alpha_per_rank={a!r} must be a number > 0 or null")


@dataclass(frozen=True, kw_only=True)
class MoRASpace:
    """MoRA choices: the LoRA-parity rank (sets ``r_hat``) and the compress/decompress operator."""

    rank: tuple[int, ...] = (8,)
    operator: tuple[str, ...] = ("rotation", "sharing")

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", _choices("mora.rank", self.rank, int, positive_int))
        ops = _choices("mora.operator", self.operator, str)
        object.__setattr__(
            self, "operator", tuple(coerce_enum(MoRAOperator, o, "mora.operator").value for o in ops)
        )


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Everything a trial samples (see the module docstring for the YAML form).

    Attributes:
        methods: Methods the search may pick (``more``, ``lora``, ``mora``), with the sizes below.
        arms: Method specs tried as they are (any method, e.g. ``peft:vera:r=256``); they set the
            adapter only (the search samples lr and batch size).
        lr: Learning-rate interval.
        lr_by_method: Per method (``more``) or peft type (``peft:vera``), its own interval.
        batch_size: Batch sizes.
        target_modules: Module choices, each ``"default"``, ``"all-linear"``, names joined by commas
            (``"query,value"``) or a regex.
        more: MoRe architecture choices.
        lora: LoRA choices.
        mora: MoRA choices.

    Raises:
        ConfigError: Any invalid or unknown entry (named in the message).
    """

    methods: tuple[str, ...] = ("more",)
    arms: tuple[str, ...] = ()
    lr: FloatRange = field(default_factory=lambda: FloatRange(low=1e-4, high=6.6e-4))
    lr_by_method: dict[str, FloatRange] = field(default_factory=dict)
    batch_size: tuple[int, ...] = (16, 32)
    target_modules: tuple[str, ...] = (DEFAULT_TARGETS,)
    more: MoReSpace = field(default_factory=MoReSpace)
    lora: LoRASpace = field(default_factory=LoRASpace)
    mora: MoRASpace = field(default_factory=MoRASpace)

    def __post_init__(self) -> None:
        given = self.methods if isinstance(self.methods, (list, tuple)) else (self.methods,)
        arms = self.arms if isinstance(self.arms, (list, tuple)) else (self.arms,)
        if arms:
            object.__setattr__(self, "arms", _arms(arms))
        methods = (
            _choices("methods", [m.lower() if isinstance(m, str) else m for m in given], str)
            if (given or not arms)
            else ()
        )  # any case
        for m in methods:
            if m not in SIZED_METHODS:
                raise ConfigError(
                    f"search space methods: {m!r} is not one of {list(SIZED_METHODS)} (other methods, and "
                    "peft ones, go in arms: e.g. peft:vera:r=256)"
                )
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "lr", _range("lr", self.lr))
        if not isinstance(self.lr_by_method, Mapping):
            raise ConfigError(
                f"search space lr_by_method={self.lr_by_method!r} must map a method (or peft:<type>) "
                "to {low, high, log}"
            )
        object.__setattr__(
            self,
            "lr_by_method",
            {family_key(k): _range(f"lr_by_method.{k}", v) for k, v in self.lr_by_method.items()},
        )
        object.__setattr__(self, "batch_size", _choices("batch_size", self.batch_size, int, positive_int))
        object.__setattr__(self, "target_modules", _choices("target_modules", self.target_modules, str))
        for name, cls in (("more", MoReSpace), ("lora", LoRASpace), ("mora", MoRASpace)):
            object.__setattr__(self, name, _from_mapping(cls, name, getattr(self, name)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchSpace:
        """A space from a mapping (the ``space:`` entry of a search file); None gives the defaults.
        ``arms`` without ``methods`` searches the arms only.

        Raises:
            ConfigError: Unknown keys or invalid values.
        """
        data = dict(data or {})
        if data.get("arms") and "methods" not in data:
            data["methods"] = ()
        return _from_mapping(cls, "space", data)

    def lr_for(self, family: str) -> FloatRange:
        """The learning-rate interval of an arm family (``more``, ``peft:vera``): ``lr_by_method`` for
        ``peft:<type>``, then for its method (``peft``), then ``lr``."""
        return self.lr_by_method.get(family) or self.lr_by_method.get(family.split(":")[0]) or self.lr

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values (``from_dict`` reverses it)."""

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value.value if isinstance(value, enum.Enum) else value

        out = plain(self)
        for key in ("arms", "lr_by_method"):  # left out when unused: a study saved before them still matches
            if not out[key]:
                del out[key]
        return out

    def sampled(self) -> dict[str, Any]:
        """What a trial can draw: each architecture with its changes and learning-rate interval, and
        the batch sizes. Two spaces with equal ``sampled()`` search the same thing, however they are
        written (a ``lr_by_method`` entry or sub-space of a method not searched changes nothing).
        """
        return {
            "architectures": {
                key: (changes, self.lr_for(family_of(key))) for key, changes in self.architectures().items()
            },
            "batch_size": self.batch_size,
        }

    def architectures(self) -> dict[str, dict[str, Any]]:
        """Every discrete choice (method, its sizes, target modules) by a readable key, in a fixed order.

        Returns:
            ``{key: TrainConfig changes}``, e.g. ``"more:nblocks=4,block_rank=2 on default"`` ->
            ``{"method": "more", "nblocks": 4, "block_rank": 2}``. Square MoRe blocks carry
            ``block_rank=SQUARE`` ("square"), resolved against the model's layer shapes by the search;
            ``target_modules`` is left out for ``"default"`` (the run config's value is kept).
        """
        methods: list[tuple[str, dict[str, Any]]] = []
        for method in self.methods:
            if method == "more":
                for shape in self.more.block_shape:
                    if shape is BlockShape.SQUARE:
                        methods += [
                            (
                                f"more:square,nblocks={n}",
                                {"method": "more", "nblocks": n, "block_rank": SQUARE},
                            )
                            for n in self.more.square_nblocks
                        ]
                    else:
                        methods += [
                            (
                                f"more:nblocks={n},block_rank={r}",
                                {"method": "more", "nblocks": n, "block_rank": r},
                            )
                            for n in self.more.nblocks
                            for r in self.more.block_rank
                        ]
            elif method == "lora":
                a = self.lora.alpha_per_rank
                methods += [
                    (
                        f"lora:rank={r}",
                        {"method": "lora", "rank": r, **({"alpha": float(a * r)} if a else {})},
                    )
                    for r in self.lora.rank
                ]
            else:
                methods += [
                    (
                        f"mora:rank={r},operator={o}",
                        {"method": "mora", "rank": r, "operator": o, "r_hat": None},
                    )
                    for r in self.mora.rank
                    for o in self.mora.operator
                ]
        for spec in self.arms:
            methods.append((spec, arm_changes(parse_method_spec(spec))))
        out = {}
        for key, changes in methods:
            for targets in self.target_modules:
                extra = {} if targets == DEFAULT_TARGETS else {"target_modules": targets}
                out[f"{key}{ON}{targets}"] = {**changes, **extra}
        return out

    def suggest(self, trial: Any, architectures: list[str]) -> tuple[str, float, int]:
        """Sample ``(architecture key, lr, batch_size)`` with an Optuna ``trial``.

        Args:
            trial: An ``optuna.Trial``.
            architectures: The keys of :meth:`architectures` that may be tried (e.g. within the
                parameter budget), always in the same order for one study.
        """
        key = trial.suggest_categorical("architecture", list(architectures))
        lr = self.lr_for(family_of(key))
        return (
            key,
            trial.suggest_float("lr", lr.low, lr.high, log=lr.log),  # the range of the architecture's method
            trial.suggest_categorical("batch_size", list(self.batch_size)),
        )


#: Methods ``methods`` expands into sizes (the sub-spaces below); any method may be an arm.
SIZED_METHODS = METHODS  # the adapters search sizes (block_rank, rank); other arms come whole


def _range(name: str, value: Any) -> FloatRange:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"low": value[0], "high": value[1]}
    return _from_mapping(FloatRange, name, value)


def _arms(arms: Any) -> tuple[str, ...]:
    """Check the ``arms`` specs: parsed, distinct, setting the adapter only.

    Raises:
        ConfigError: A bad spec, a repeated arm, or an arm overriding a shared setting.
    """
    seen = {}
    for spec in arms:
        parsed = parse_method_spec(spec)
        extra = overrides(parsed)
        if extra:
            raise ConfigError(
                f"search space arm {spec!r} sets {sorted(extra)}; a search arm chooses the adapter "
                "only (the search samples lr and batch_size; per-method lr ranges: lr_by_method)"
            )
        key = repr(sorted(adapter_part(parsed).items()))
        if key in seen:
            raise ConfigError(f"search space arms {seen[key]!r} and {spec!r} are the same arm")
        seen[key] = spec
    return tuple(arms)
