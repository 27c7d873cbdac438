"""The learning-rate ranges of a search space: :class:`FloatRange`, and the arm families that
``lr_by_method`` keys name (a method such as ``more``, or ``peft:<type>``).

:class:`moreft.search.space.SearchSpace` reads ``lr`` and ``lr_by_method`` into these ranges and
samples an architecture's rate from its family's range (:meth:`~moreft.search.space.SearchSpace.lr_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moreft.errors import ConfigError
from moreft.train.choices import TRAIN_METHODS

#: Separates an architecture key's method part from its target modules.
ON = " on "


@dataclass(frozen=True, kw_only=True)
class FloatRange:
    """A float interval, sampled log-uniformly when ``log`` (the usual choice for learning rates)."""

    low: float
    high: float
    log: bool = True

    def position(self, value: float) -> float:
        """Where ``value`` lies in the range: 0 at ``low``, 1 at ``high`` (on the log scale when ``log``)."""
        if self.high == self.low:
            return 0.5
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = float(value)  # YAML reads 1e-4 as a string
                except ValueError:
                    raise ConfigError(f"search space lr.{name}={value!r} must be a number") from None
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"search space lr.{name}={value!r} must be a number > 0")
            object.__setattr__(self, name, float(value))
        if self.low > self.high:
            raise ConfigError(f"search space lr: low={self.low:g} must be <= high={self.high:g}")
        if not isinstance(self.log, bool):
            raise ConfigError(f"search space lr.log={self.log!r} must be true or false")


def family_of(key: str) -> str:
    """The arm family of an architecture key or label: ``more``, ``lora``, ``mora``, ``peft:<type>``, ..."""
    label = key.partition(ON)[0]
    method, _, rest = label.partition(":")
    return f"peft:{rest.partition(':')[0].lower()}" if method == "peft" else method


def family_key(key: Any) -> str:
    """Check a ``lr_by_method`` key: a method, or ``peft:<type>`` of a known peft type."""
    if not isinstance(key, str) or key.split(":")[0].lower() not in TRAIN_METHODS:
        raise ConfigError(
            f"search space lr_by_method key {key!r} must be a method ({', '.join(TRAIN_METHODS)}) or "
            "peft:<type>, e.g. peft:vera"
        )
    method, _, peft_type = key.lower().partition(":")
    if peft_type:
        if method != "peft":
            raise ConfigError(
                f"search space lr_by_method key {key!r}: only peft arms have a type (peft:<type>)"
            )
        from moreft.train.peft_arm import config_class

        peft_type = config_class(peft_type)[0]
    return f"{method}:{peft_type}" if peft_type else method
