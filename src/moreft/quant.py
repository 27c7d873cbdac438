"""Quantised frozen bases (QLoRA-style): adapters train on them as on any base; merging needs care.

The adapter layer calls the quantised base layer's own forward (torchao int8/int4 weight tensors,
bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) and keeps its own factors in float32, so
training, saving and loading are unchanged. Merging is not: ΔW cannot be added into an integer
weight in place, and requantising ``W + ΔW`` rounds away part of ΔW (often most of it: a
fine-tuning update is small next to one quantisation step). So :func:`moreft.merge` refuses a
model with any quantised base (checking every layer before it writes one) with a message saying what to do, and :func:`merge_quantized` does the
dequantise → add (float32) → requantise round trip on request, reporting per layer how much of ΔW
the rounding lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MergeError
from .inject import adapter_layers, merge
from .layers import is_conv1d
from .layers.quantized import quantized_kind, refuse_quantized, refuse_quantized_layers

__all__ = [
    "QuantizedMerge",
    "merge_quantized",
    "quantized_kind",
    "refuse_quantized",
    "refuse_quantized_layers",
]


@dataclass(frozen=True)
class QuantizedMerge:
    """What requantising ``W + ΔW`` cost on one layer.

    Attributes:
        name: The layer's qualified name.
        kind: The quantised weight's class (e.g. ``Int8Tensor``).
        max_abs_error: ``max |dequant(requant(W + ΔW)) - (W + ΔW)|``, the merged weight's rounding error.
        max_abs_delta: ``max |ΔW|``, for scale.
        delta_error: ``max |(dequant(requant(W + ΔW)) - dequant(W)) - ΔW| / max |ΔW|``: how much of
            the adapter's update the requantisation lost (0 is perfect, 1 or more: all of it).
    """

    name: str
    kind: str
    max_abs_error: float
    max_abs_delta: float
    delta_error: float


def _dense(weight: Any) -> torch.Tensor:
    """A quantised weight as a float tensor (torchao tensors have ``dequantize()``)."""
    kind = quantized_kind(weight)
    dequantize = getattr(weight, "dequantize", None)
    if kind is None or not callable(dequantize) or kind.startswith(("Params4bit", "Int8Params")):
        raise MergeError(
            f"cannot dequantise a {kind or type(weight).__name__} weight here; only torchao "
            "quantised weights can be merged into (load a bitsandbytes base unquantised to merge)"
        )
    return dequantize()


@torch.no_grad()
def merge_quantized(model: nn.Module, requantize: Any) -> list[QuantizedMerge]:
    """Merge every adapter into a torchao-quantised base: dequantise, add ΔW in float32, requantise.

    All merged weights are computed and checked before any layer changes; the model then has
    no moreft layer left, like after :func:`moreft.merge`.

    Args:
        model: A model with a moreft adapter whose targeted base layers hold torchao weights.
        requantize: The torchao config to requantise with, e.g. ``Int8WeightOnlyConfig()``
            (the one the base was quantised with).

    Returns:
        One :class:`QuantizedMerge` per layer.

    Raises:
        MergeError: a base weight is not a torchao quantised tensor, or ``W + ΔW`` is not finite.
    """
    from torchao.quantization import quantize_

    plans = {}
    for name, layer in adapter_layers(model).items():
        if layer.merged:
            continue
        weight = layer.base_layer.weight
        dense = _dense(weight)
        delta = layer.delta_weight().detach().float()
        delta = delta.T if is_conv1d(layer.base_layer) else delta  # Conv1D stores (in, out)
        exact = dense.float() + delta.to(dense.device)
        if not torch.isfinite(exact).all():
            raise MergeError(f"merging adapter layer {name!r} would give NaN/Inf weights; nothing was merged")
        plans[name] = (layer, quantized_kind(weight), dense, delta, exact)
    reports = []
    for name, (layer, kind, dense, delta, exact) in plans.items():
        base = layer.base_layer
        base.weight = nn.Parameter(exact.to(dense.dtype), requires_grad=False)
        quantize_(base, requantize)
        merged = base.weight.dequantize().float()
        scale = float(delta.abs().max())
        lost = float(((merged - dense.float()) - delta).abs().max())
        reports.append(
            QuantizedMerge(
                name,
                str(kind),
                float((merged - exact).abs().max()),
                scale,
                lost / scale if scale > 0 else 0.0,
            )
        )
        layer.merged = True
    merge(model)  # every layer is merged now: this only puts the base layers back
    return reports
