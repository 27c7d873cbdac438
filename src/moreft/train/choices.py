"""The run settings' own choices (enums); the adapters' choices are the library's (:mod:`moreft.options`)."""

from __future__ import annotations

import enum

from moreft.config import Method


class RunMethod(str, enum.Enum):
    """What a run trains: an adapter of one of the library's families (:class:`moreft.Method`), ``full``
    (every base parameter: full fine-tuning, the reference arm of the papers' tables), or ``peft``: any
    peft method (``peft_type``, ``peft_options``).

    ``full`` and ``peft`` are run-level choices, not :class:`moreft.Method` members: the library builds
    moreft's adapters, and neither has a moreft adapter config, so the adapter settings do not apply.
    """

    MORE = Method.MORE.value
    MORA = Method.MORA.value
    LORA = Method.LORA.value
    FULL = "full"
    PEFT = "peft"


#: The adapter methods (what ``moreft search`` sizes and chooses among).
METHODS = tuple(m.value for m in Method)
#: Every method a run may train: the adapters, ``full`` and ``peft``.
TRAIN_METHODS = tuple(m.value for m in RunMethod)


class Precision(str, enum.Enum):
    """The base model's weights and compute: fp32, or bf16 (weights in bf16, autocast; adapters stay fp32)."""

    FP32 = "fp32"
    BF16 = "bf16"


class NonFinitePolicy(str, enum.Enum):
    """What a NaN/Inf training loss does: ``stop`` the run, or ``skip`` that optimizer step."""

    STOP = "stop"
    SKIP = "skip"


class MergeSchedule(str, enum.Enum):
    """The learning rate after each ReLoRA / ReMoRA merge (:mod:`moreft.train.reinit`).

    JAGGED: the run's schedule times a warmup ramp after each merge (adapter optimizer state
    dropped). OFFICIAL: kongds/MoRA's, the schedule restarts from the current lr with a warmup and
    decays over the remaining steps (all optimizer state dropped).
    """

    JAGGED = "jagged"
    OFFICIAL = "official"
