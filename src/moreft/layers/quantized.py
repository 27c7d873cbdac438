"""Recognising a quantised base weight, so that merging can refuse it before touching anything.

Kept beside the layers (which call :func:`refuse_quantized` when merging) and below
:mod:`moreft.quant`, which merges into quantised bases on request.
"""

from __future__ import annotations

from typing import Any

from ..errors import MergeError

_QUANT_PACKAGES = ("torchao", "bitsandbytes")


def quantized_kind(weight: Any) -> str | None:
    """The class name of a quantised weight (a torchao tensor subclass or bitsandbytes parameter), else None."""
    cls = type(weight)
    return cls.__name__ if cls.__module__.split(".")[0] in _QUANT_PACKAGES else None


def refuse_quantized(layer: Any) -> None:
    """Raise if ``layer``'s base weight is quantised (called by merge before it touches anything).

    Raises:
        MergeError: the base weight is a quantised tensor.
    """
    kind = quantized_kind(layer.base_layer.weight)
    if kind is not None:
        raise MergeError(f"adapter layer {layer.name!r} sits on a quantised base weight ({kind}); ΔW cannot be "
                         "added into it in place. Use moreft.quant.merge_quantized(model, requantize=<torchao "
                         "config>) to dequantise, add and requantise (it reports the rounding error), or merge "
                         "into a bf16/fp32 copy of the base model; nothing was merged")
