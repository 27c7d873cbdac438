"""Register moreft's methods with peft: the one import-time effect of ``import moreft``.

peft dispatches on a config's ``peft_type`` through three tables in ``peft.mapping``. Its
``PeftType`` enum cannot be extended from outside (``peft.utils.register_peft_method`` refuses
unknown names), but the tables accept plain strings beside the enum members, and every peft entry
point used here (``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``,
``AutoPeftModel*``, transformers' ``load_adapter``) looks types up in them. Registering is
idempotent and adds three keys per method; it changes no existing entry.
"""

from __future__ import annotations

from typing import Any, cast

from peft import mapping

from ..config import CONFIG_CLASSES, PEFT_TYPES, Method
from .model import LoRAModel, MoRAModel, MoreftTuner, MoReModel

TUNERS: dict[Method, type[MoreftTuner]] = {
    Method.MORE: MoReModel,
    Method.MORA: MoRAModel,
    Method.LORA: LoRAModel,
}


def register() -> None:
    """Make ``"MORE"``, ``"MORA"`` and ``"MOREFT_LORA"`` known peft types (idempotent)."""
    for method, tuner in TUNERS.items():
        peft_type = PEFT_TYPES[method]
        _table(mapping.PEFT_TYPE_TO_CONFIG_MAPPING)[peft_type] = CONFIG_CLASSES[method]
        _table(mapping.PEFT_TYPE_TO_TUNER_MAPPING)[peft_type] = tuner
        _table(mapping.PEFT_TYPE_TO_PREFIX_MAPPING)[peft_type] = tuner.prefix


def registered() -> bool:
    """True when every moreft peft type is in peft's tables with moreft's classes."""
    return all(_table(mapping.PEFT_TYPE_TO_TUNER_MAPPING).get(PEFT_TYPES[m]) is t for m, t in TUNERS.items())


def _table(table: dict[Any, Any]) -> dict[str, Any]:
    """One of peft's tables, typed as what it holds: peft annotates ``dict[PeftType, ...]``, but the
    keys are compared as strings and moreft's types are ``str`` enums, not ``PeftType`` members."""
    return cast("dict[str, Any]", table)
