"""Typed, validated adapter configurations; each is a ``peft.PeftConfig`` with its own peft type.

A config says *what* to build (method hyperparameters and which modules to adapt); layer
shapes are only known at injection time, so rules that depend on them (``nblocks <= in``,
TRUNCATION's ``r_hat <= min(in, out)``) are checked by the layers, not here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft.config import PeftConfig

from .config_checks import ALL_LINEAR as ALL_LINEAR  # re-exported: moreft.config.ALL_LINEAR
from .config_checks import _names, _probability, _targets, coerce_enum, positive_int
from .errors import ConfigError
from .options import (
    BlockRule,
    Composition,
    InitMode,
    Method,
    MoRAOperator,
    RHatRounding,
    SharingLayout,
    check_variant,
)


class MoreftPeftType(str, enum.Enum):
    """moreft's peft types: strings (``"MORE"`` is a key of peft's tables) with ``.value`` as peft's enum has.

    transformers' adapter loading reads ``peft_type.value``; peft's own ``PeftType`` cannot be extended.
    """

    MORE = "MORE"
    MORA = "MORA"
    MOREFT_LORA = "MOREFT_LORA"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: The peft type of each method (``peft.mapping`` keys; see :mod:`moreft.tuners.registration`).
PEFT_TYPES: dict[Method, MoreftPeftType] = {
    Method.MORE: MoreftPeftType.MORE,
    Method.MORA: MoreftPeftType.MORA,
    Method.LORA: MoreftPeftType.MOREFT_LORA,
}


#: Fields every peft config has (bookkeeping: type, version, base model, mode), not hyperparameters.
PEFT_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(PeftConfig))


@dataclass(kw_only=True)
class AdapterConfig(PeftConfig):
    """Fields every method shares; a peft config (``peft.get_peft_model`` accepts it).

    Attributes:
        target_modules: module names to adapt: a list (exact qualified name or dotted suffix,
            e.g. ``"query"``), a regex string (full match on the qualified name), ``"all-linear"``
            (every linear layer but the output head), or None for the model family's default.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a
            classifier head), matched like ``target_modules`` lists.
        dropout: dropout probability inside the adapter branch (0 disables it).
        init_weights: True for ΔW = 0 at the start; False for a random non-zero ΔW (tests).

    Raises:
        ConfigError: (from ``__init__``) a value of the wrong type or out of range.
    """

    method: ClassVar[Method]
    target_modules: tuple[str, ...] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: names (exact or dotted suffix), a regex (full match), 'all-linear', "
            "or None for the model family's default."
        },
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Extra modules trained in full and saved with the adapter (e.g. a classifier head)."
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability in the adapter branch, in [0, 1)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: ΔW = 0 at the start. False: a random non-zero ΔW (for tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPES[self.method]
        self.target_modules = _targets(self.target_modules)
        # a list, as peft's: PeftModelForSequenceClassification appends its head names to it
        self.modules_to_save = list(
            _names("modules_to_save", [] if self.modules_to_save is None else self.modules_to_save)
        )
        self.dropout = _probability("dropout", self.dropout)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (peft's ``adapter_config.json`` schema) that :func:`config_from_dict` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.value
                if isinstance(value, enum.Enum)
                else (list(value) if isinstance(value, (tuple, set)) else value)
            )
        return out


@dataclass(kw_only=True)
class MoReConfig(AdapterConfig):
    """MoRe: ΔW = P1·blkdiag2·P2·blkdiag1 with ``nblocks`` blocks of rank ``block_rank``; no alpha.

    About ``block_rank * (in + out)`` parameters per layer, rank up to ``nblocks * block_rank``.

    The paper's Appendix C / E variants are options, all off by default (the default adapter is
    unchanged): ``composition`` (additive, or ``W' = (I + c·M)·W``), ``alpha`` (a fixed output
    scale), ``learnable_scale`` / ``scale_init`` (a trained scalar ``s`` on the adapter output, so
    ``c = alpha·s``) and ``init_mode`` (``"principal"``: start from W's best MoRe approximation).
    docs/more-variants.md states each formula.

    Raises:
        ConfigError: ``nblocks`` or ``block_rank`` not an integer >= 1, an unknown composition or
            init mode, or options that do not go together (:func:`moreft.options.check_variant`).
    """

    method: ClassVar[Method] = Method.MORE
    nblocks: int = field(
        default=4, metadata={"help": "Number of diagonal blocks (integer >= 1, <= in_features)."}
    )
    block_rank: int = field(
        default=4,
        metadata={"help": "Rank of each block (integer >= 1); ΔW has rank up to nblocks * block_rank."},
    )
    block_rule: BlockRule = field(
        default=BlockRule.MOREFT,
        metadata={
            "help": "Block shapes: 'moreft' (default), or the MoRe authors' 'official' / 'official-int' rules "
            "(docs/interop.md)."
        },
    )
    composition: Composition = field(
        default=Composition.ADDITIVE,
        metadata={
            "help": "'additive' (W + c·M, the paper's) or 'multiplicative' ((I + c·M)·W, Appendix C; M is out x out)."
        },
    )
    alpha: float = field(
        default=1.0,
        metadata={
            "help": "Fixed scale on the adapter output (ΔW·alpha; Appendix C's 'scaler α'); a number > 0, 1 = none."
        },
    )
    learnable_scale: bool = field(
        default=False,
        metadata={
            "help": "Multiply the adapter output by a trained scalar s (Appendix C's 'scaler parameter')."
        },
    )
    scale_init: float = field(
        default=0.0,
        metadata={
            "help": "Start value of the learnable scalar (the authors' code: 0, with both factors random); "
            "only with learnable_scale."
        },
    )
    init_mode: InitMode = field(
        default=InitMode.ZERO,
        metadata={
            "help": "'zero' (the paper's init) or 'principal' (start from W's best MoRe approximation, "
            "Appendix E; the same product is subtracted, so the model is unchanged at step 0)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("nblocks", self.nblocks)
        positive_int("block_rank", self.block_rank)
        self.block_rule = coerce_enum(BlockRule, self.block_rule, "block_rule")
        self.composition = coerce_enum(Composition, self.composition, "composition")
        self.init_mode = coerce_enum(InitMode, self.init_mode, "init_mode")
        self.alpha, self.scale_init = check_variant(
            self.composition, self.alpha, self.learnable_scale, self.scale_init, self.init_mode
        )

    @property
    def is_default_variant(self) -> bool:
        """True for the paper's adapter (additive, no scale, zero init): the fused and Triton paths apply."""
        return (
            self.composition is Composition.ADDITIVE
            and self.alpha == 1.0
            and not self.learnable_scale
            and self.init_mode is InitMode.ZERO
        )


@dataclass(kw_only=True)
class MoRAConfig(AdapterConfig):
    """MoRA: one square ``r_hat x r_hat`` matrix between parameter-free compress/decompress.

    ``r_hat`` defaults to ``floor(sqrt((in + out) * rank))`` per layer (LoRA-rank-``rank``
    parameter parity), rounded down to even for ROTATION and capped at ``min(in, out)`` for
    TRUNCATION and SHARING. An explicit ``r_hat`` is used as given and checked per layer.

    The authors' code differs in three ways, each an option here: ``r_hat_rounding="round"``
    (their ``int(sqrt(...) + 0.5)``), ``cap_r_hat=False`` (SHARING above ``min(in, out)``, as
    their code allows) and ``sharing_output_layout`` (their ``mora_type`` 3 and 4 group the
    inputs with one layout and the outputs with the other). ``sharing_layout`` is the input
    grouping, and the output grouping too unless ``sharing_output_layout`` is set.

    Raises:
        ConfigError: a non-positive ``rank`` / ``r_hat``, an unknown operator, layout or rounding,
            an odd ``r_hat`` for ROTATION, a non-boolean ``cap_r_hat``.
    """

    method: ClassVar[Method] = Method.MORA
    rank: int = field(
        default=8, metadata={"help": "LoRA rank whose parameter count r_hat matches (integer >= 1)."}
    )
    r_hat: int | None = field(
        default=None,
        metadata={"help": "Explicit side of the square matrix; None derives it per layer from rank."},
    )
    operator: MoRAOperator = field(
        default=MoRAOperator.ROTATION,
        metadata={"help": "Compress/decompress pair: 'truncation', 'sharing', 'decouple' or 'rotation'."},
    )
    sharing_layout: SharingLayout = field(
        default=SharingLayout.STRIDED,
        metadata={
            "help": "Grouping of the 'sharing' operator: 'strided' or 'adjacent' (inputs, and outputs unless "
            "sharing_output_layout is set)."
        },
    )
    sharing_output_layout: SharingLayout | None = field(
        default=None,
        metadata={
            "help": "Output grouping of 'sharing' when it differs from the input's (the authors' mora_type 3/4)."
        },
    )
    r_hat_rounding: RHatRounding = field(
        default=RHatRounding.FLOOR,
        metadata={
            "help": "How r_hat is rounded from sqrt((in + out) * rank): 'floor' (the paper) or 'round' (the authors' code)."
        },
    )
    cap_r_hat: bool = field(
        default=True,
        metadata={"help": "Cap a derived r_hat at min(in, out) for 'sharing' (the authors' code does not)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("rank", self.rank)
        if self.r_hat is not None:
            positive_int("r_hat", self.r_hat)
        self.operator = coerce_enum(MoRAOperator, self.operator, "operator")
        self.sharing_layout = coerce_enum(SharingLayout, self.sharing_layout, "sharing_layout")
        if self.sharing_output_layout is not None:
            self.sharing_output_layout = coerce_enum(
                SharingLayout, self.sharing_output_layout, "sharing_output_layout"
            )
        self.r_hat_rounding = coerce_enum(RHatRounding, self.r_hat_rounding, "r_hat_rounding")
        if not isinstance(self.cap_r_hat, bool):
            raise ConfigError(f"cap_r_hat={self.cap_r_hat!r} must be true or false")
        if self.operator is MoRAOperator.ROTATION and self.r_hat is not None and self.r_hat % 2:
            raise ConfigError(
                f"r_hat={self.r_hat} must be even for operator 'rotation' (it rotates pairs of coordinates)"
            )


@dataclass(kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA: ΔW = (alpha / rank) · B·A with A Kaiming-initialised and B zero.

    Raises:
        ConfigError: ``rank`` not an integer >= 1, ``alpha`` not a finite number > 0.
    """

    method: ClassVar[Method] = Method.LORA
    rank: int = field(default=8, metadata={"help": "Rank of B·A (integer >= 1)."})
    alpha: float = field(default=16.0, metadata={"help": "Scale numerator: ΔW = (alpha / rank) · B·A (> 0)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("rank", self.rank)
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not 0 < self.alpha < math.inf
        ):
            raise ConfigError(f"alpha={self.alpha!r} must be a number > 0 and finite")
        self.alpha = float(self.alpha)


CONFIG_CLASSES: dict[Method, type[AdapterConfig]] = {
    Method.MORE: MoReConfig,
    Method.MORA: MoRAConfig,
    Method.LORA: LoRAConfig,
}


def config_from_dict(data: object) -> AdapterConfig:
    """Build a config from :meth:`AdapterConfig.to_dict` output or a saved adapter's JSON.

    ``data`` is checked, not trusted: anything but a mapping of known fields raises ConfigError.

    The method comes from ``method`` (moreft's own files) or ``peft_type`` (peft's layout).

    Raises:
        ConfigError: unknown method, unknown keys, or invalid values.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"an adapter config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    method_value = data.pop("method", None)
    by_peft_type = {v.value: k for k, v in PEFT_TYPES.items()}
    if method_value is None and "peft_type" in data:
        peft_type = data["peft_type"]
        if not isinstance(peft_type, str) or peft_type not in by_peft_type:
            raise ConfigError(
                f"peft_type={peft_type!r} must be one of {sorted(by_peft_type)} (moreft's peft types)"
            )
        method_value = by_peft_type[peft_type]
    method = coerce_enum(Method, method_value, "method")
    cls = CONFIG_CLASSES[method]
    if data.get("peft_type", PEFT_TYPES[method].value) != PEFT_TYPES[method].value:
        raise ConfigError(
            f"peft_type={data['peft_type']!r} disagrees with method {method.value!r} "
            f"(whose peft type is {PEFT_TYPES[method].value!r})"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} for method {method.value!r}; valid keys: {sorted(known)}")
    for key, kinds in _BOOKKEEPING_TYPES.items():
        if key in data and not isinstance(data[key], kinds):
            raise ConfigError(f"{key}={data[key]!r} must be {' or '.join(_KIND_NAMES[k] for k in kinds)}")
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad {method.value} config: {exc}") from None


#: Types of peft's bookkeeping fields in a saved config (peft itself does not check them).
_BOOKKEEPING_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str, type(None)),
    "task_type": (str, type(None)),
    "peft_version": (str, type(None)),
    "base_model_name_or_path": (str, type(None)),
    "revision": (str, type(None)),
    "inference_mode": (bool,),
    "auto_mapping": (dict, type(None)),
}
_KIND_NAMES = {str: "a string", type(None): "null", bool: "true or false", dict: "a mapping"}
