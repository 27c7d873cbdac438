"""When an adapter layer's fused forward (``moreft.ops.fused``) may stand in for its reference path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules import module as registry  # the global hook registries

from ..ops import fused as _fused
from .linear import conv1d_type, is_conv1d

_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def _has_hooks(module: nn.Module) -> bool:
    """Hooks the fused path would skip: on ``module`` itself or global, forward or backward."""
    own = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )
    global_ = (
        registry._global_forward_hooks,
        registry._global_forward_pre_hooks,
        registry._global_backward_hooks,
        registry._global_backward_pre_hooks,
    )
    return any(own) or any(global_)


def fused_weight_bias(
    base: nn.Module,
    x: Tensor,
    in_features: int,
    dropout: nn.Module,
    params: Iterable[Tensor],
    enabled: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """The base ``(weight (out, in), bias)`` when the fused path may run on ``x``, else None.

    See :meth:`moreft.layers.base.AdapterLayer._base_weight_bias`; ``enabled`` is the layer's
    ``fused`` switch resolved, ``dropout`` and ``params`` those of the adapter.
    """
    if not enabled or not (type(base) is nn.Linear or type(base) is conv1d_type()) or _has_hooks(base):
        return None
    if any(type(t) not in _PLAIN_TENSORS for t in (base.weight, base.bias) if t is not None):
        return None  # tensor subclasses (quantised, DTensor) keep their own dispatch
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return None
    if x.dim() == 0 or x.shape[-1] != in_features:
        return None
    stored, bias = cast(Tensor, base.weight), cast("Tensor | None", base.bias)
    weight = stored.T if is_conv1d(base) else stored  # (out, in)
    if not _fused.fusable(x, weight, *params, *(() if bias is None else (bias,))):
        return None
    return weight, bias
