"""Recognising a quantised base weight, so that merging can refuse it before touching anything.

Kept beside the layers (which call :func:`refuse_quantized` when merging) and below
:mod:`moreft.quant`, which merges into quantised bases on request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MergeError

_QUANT_PACKAGES = ("torchao", "bitsandbytes")


def quantized_kind(weight: Any) -> str | None:
    """The class name of a quantised weight (a torchao tensor subclass or bitsandbytes parameter), else None."""
    cls = type(weight)
    return cls.__name__ if cls.__module__.split(".")[0] in _QUANT_PACKAGES else None


def refuse_quantized(layer: Any) -> None:
    """Raise if ``layer``'s base weight is quantised (called by a layer's merge before it touches anything).

    Raises:
        MergeError: the base weight is a quantised tensor.
    """
    refuse_quantized_layers({layer.name: layer})


def refuse_quantized_layers(layers: Mapping[str, Any]) -> None:
    """Raise if any of ``layers`` (``{name: adapter layer}``) sits on a quantised base weight.

    :func:`moreft.merge` and the peft tuner's merge call this on every layer before they write
    any weight, so a model where only some bases are quantised is merged all or nothing.

    Raises:
        MergeError: naming every layer whose base weight is quantised (and its kind); nothing was merged.
    """
    bad = {
        name: kind
        for name, layer in layers.items()
        if (kind := quantized_kind(layer.base_layer.weight)) is not None
    }
    if not bad:
        return
    if len(bad) == 1:
        ((name, kind),) = bad.items()
        what = f"adapter layer {name!r} sits on a quantised base weight ({kind})"
    else:
        listed = ", ".join(f"{name!r} ({kind})" for name, kind in bad.items())
        what = f"{len(bad)} adapter layers sit on quantised base weights: {listed}"
    raise MergeError(
        f"{what}; ΔW cannot be added into it in place. Use moreft.quant.merge_quantized(model, "
        "requantize=<torchao config>) to dequantise, add and requantise (it reports the rounding "
        "error), or merge into a bf16/fp32 copy of the base model; nothing was merged"
    )
