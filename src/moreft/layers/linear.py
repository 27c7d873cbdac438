"""The layer types moreft wraps: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight ``(in, out)``)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

_CONV1D: list[
    type[nn.Module] | None
] = []  # looked up once; a plain list, not functools.cache, for torch.compile


def conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class, or None without transformers."""
    if not _CONV1D:
        conv1d: type[nn.Module] | None
        try:
            from transformers.pytorch_utils import Conv1D as conv1d
        except ImportError:  # transformers is a dependency, but the layers work without it
            conv1d = None
        _CONV1D.append(conv1d)
    return _CONV1D[0]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (a linear layer with weight stored ``(in, out)``)."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """True for the layer types moreft can wrap: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a wrappable layer."""
    if is_conv1d(module):
        in_features, out_features = cast(Tensor, module.weight).shape
        return out_features, in_features
    linear = cast(nn.Linear, module)
    return linear.out_features, linear.in_features


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in fp32 (fp64 kept for exactness tests) even on bf16/fp16 bases."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
