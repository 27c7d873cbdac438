"""What every adapter layer shares: wrapping a linear base layer, and merging by ``delta_weight``.

A concrete layer declares its parameters in ``adapter_param_names`` and implements
``delta_weight()`` (dense ``ΔW``, shape ``(out, in)``) and ``adapter_forward(x)`` (``x · ΔWᵀ``
plus dropout). Forward, merge, unmerge, save and export all go through these two.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, Method
from ..errors import MergeError, TargetError


@functools.cache
def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the layers work without it
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (a linear layer with weight stored ``(in, out)``)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """True for the layer types moreft can wrap: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a wrappable layer."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in fp32 (fp64 kept for exactness tests) even on bf16/fp16 bases."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


@runtime_checkable
class AdapterModule(Protocol):
    """The interface the rest of moreft relies on (a Protocol, as in torchtune)."""

    base_layer: nn.Module
    merged: bool

    def delta_weight(self) -> Tensor: ...

    def adapter_params(self) -> dict[str, nn.Parameter]: ...

    def merge(self, safe: bool = False) -> None: ...

    def unmerge(self) -> None: ...


class AdapterLayer(nn.Module):
    """Base of the concrete layers: owns ``base_layer`` and the merge mechanics."""

    method: ClassVar[Method]
    adapter_param_names: ClassVar[tuple[str, ...]]

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "") -> None:
        if isinstance(base_layer, AdapterLayer):
            raise TargetError(f"module {name!r} already has a {base_layer.method.value} adapter; "
                              "merge it or start from a fresh model before injecting again")
        if not is_linear(base_layer):
            raise TargetError(f"module {name!r} is a {type(base_layer).__name__}; moreft adapts only "
                              "nn.Linear and transformers Conv1D layers")
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.name = name
        self.out_features, self.in_features = linear_shape(base_layer)
        self.merged = False
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    # -- defined by each method -------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """Dense ``ΔW`` of shape ``(out_features, in_features)`` in the adapter's dtype."""
        raise NotImplementedError

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The adapter branch ``x · ΔWᵀ`` (with dropout when training), in the adapter's dtype."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter parameters, by their declared names."""
        return {n: getattr(self, n) for n in self.adapter_param_names}

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(iter(self.adapter_params().values())).dtype

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.adapter_forward(x.to(self.weight_dtype)).to(y.dtype)

    def _merged_weight(self, sign: float) -> Tensor:
        """Base weight ± ΔW computed in float32 (float64 kept), in the base weight's layout."""
        weight = self.base_layer.weight
        delta = self.delta_weight().detach()
        if is_conv1d(self.base_layer):
            delta = delta.T  # Conv1D stores (in, out)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return weight.detach().to(acc) + sign * delta.to(device=weight.device, dtype=acc)

    def check_mergeable(self) -> Tensor:
        """Return the merged weight (base dtype) or raise if it holds NaN/Inf; changes nothing.

        Raises:
            MergeError: if ΔW or the merged weight (after the cast to the base dtype) is not finite.
        """
        merged = self._merged_weight(+1.0).to(self.base_layer.weight.dtype)
        if not torch.isfinite(merged).all():
            bad = int((~torch.isfinite(merged)).sum())
            raise MergeError(f"merging adapter layer {self.name!r} would write {bad} NaN/Inf values "
                             f"into its {self.base_layer.weight.dtype} weight; nothing was merged")
        return merged

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add ΔW into the base weight (idempotent). ``safe`` checks for NaN/Inf first.

        Raises:
            MergeError: with ``safe=True``, if the result would not be finite (nothing changes).
        """
        if self.merged:
            return
        merged = self.check_mergeable() if safe else self._merged_weight(+1.0)
        self.base_layer.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again (idempotent); exact up to rounding."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._merged_weight(-1.0))
        self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"
