"""What every adapter layer shares: wrapping a linear base layer, the fused forward, in-place merging.

A concrete layer declares its parameters in ``adapter_param_names`` and implements
``delta_weight()`` (dense ``ΔW``, shape ``(out, in)``) and ``adapter_forward(x)`` (``x · ΔWᵀ``
plus dropout): the literal definition, which save, export and the tests rely on. For speed it may
also implement ``_fused_forward`` (base and adapter as one autograd Function, ``moreft.ops.fused``
and ``moreft.ops.blocks``; the default path where it applies) and ``_delta_adder`` (its ΔW added
into a weight in place from its factors, for merging; ``moreft.layers.merging``).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.modules import module as registry  # the global hook registries

from ..config import AdapterConfig, Method
from ..errors import MergeError, TargetError
from ..ops import fused as _fused
from ..quant import refuse_quantized
from .linear import conv1d_type, is_conv1d, is_linear, linear_shape
from .merging import DeltaAdder, accumulate_dtype, add_delta_, count_nonfinite, dense_adder

_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def _has_hooks(module: nn.Module) -> bool:
    """Hooks the fused path would skip: on ``module`` itself or global, forward or backward."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           module._backward_pre_hooks)
    global_ = (registry._global_forward_hooks, registry._global_forward_pre_hooks,
               registry._global_backward_hooks, registry._global_backward_pre_hooks)
    return any(own) or any(global_)


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
    #: Fused forward/backward (``moreft.ops.fused``) where it applies; ``None`` follows the
    #: module-wide switch ``moreft.ops.fused.set_fused_enabled``, ``False`` forces the reference.
    fused: bool | None = None

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

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """``base(x) + adapter(x)`` through one fused Function, or None where this layer has none.

        Called only when :meth:`_base_weight_bias` allows it; ``weight`` is the base weight as
        ``(out, in)`` (a transposed view for Conv1D). Must equal the reference path up to rounding.
        """
        return None

    def _delta_adder(self, dtype: torch.dtype) -> DeltaAdder:
        """How to add ``alpha · ΔW`` into (rows of) a weight in place, with ΔW's factors in ``dtype``.

        The default builds the dense ``delta_weight()`` once; layers with a cheaper structure
        override it.
        """
        weight = self.base_layer.weight
        return dense_adder(self.delta_weight().detach().to(device=weight.device, dtype=dtype))

    # -- shared ---------------------------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter parameters, by their declared names."""
        return {n: getattr(self, n) for n in self.adapter_param_names}

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(iter(self.adapter_params().values())).dtype

    def _base_weight_bias(self, x: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """The base ``(weight (out, in), bias)`` when the fused path may run on ``x``, else None.

        It may not where it could differ from ``base_layer(x) + adapter_forward(x)``: a base of
        another type (parametrised, bitsandbytes) or with hooks, a weight that is a tensor subclass
        (torchao quantised, DTensor), active dropout (the reference path draws the masks), mixed
        dtypes, autocast or ``torch.func`` transforms (``moreft.ops.fused.fusable``).
        """
        fused = self.fused if self.fused is not None else _fused.fused_enabled()
        base = self.base_layer
        if not fused or not (type(base) is nn.Linear or type(base) is conv1d_type()) or _has_hooks(base):
            return None
        if any(type(t) not in _PLAIN_TENSORS for t in (base.weight, base.bias) if t is not None):
            return None  # tensor subclasses (quantised, DTensor) keep their own dispatch
        if isinstance(self.dropout, nn.Dropout) and self.dropout.training and self.dropout.p > 0:
            return None
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            return None
        weight = base.weight.T if is_conv1d(base) else base.weight  # (out, in)
        bias = base.bias
        if not _fused.fusable(x, weight, *self.adapter_params().values(), *(() if bias is None else (bias,))):
            return None
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        if not self.merged:
            wb = self._base_weight_bias(x)
            if wb is not None:
                y = self._fused_forward(x, *wb)
                if y is not None:
                    return y
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.adapter_forward(x.to(self.weight_dtype)).to(y.dtype)

    def _oriented_weight(self) -> Tensor:
        """The base weight as ``(out, in)``: itself, or a transposed view for Conv1D."""
        weight = self.base_layer.weight
        return weight.T if is_conv1d(self.base_layer) else weight

    def _adder(self) -> DeltaAdder:
        return self._delta_adder(accumulate_dtype(self.base_layer.weight))

    @torch.no_grad()
    def check_mergeable(self) -> None:
        """Raise if merging would write NaN/Inf into the base weight; changes nothing.

        Works by row chunks of about 4 MiB, so it needs no weight-sized memory.

        Raises:
            MergeError: if ``W + ΔW``, cast to the base weight's dtype, holds NaN/Inf, or the base
                weight is quantised (:mod:`moreft.quant`).
        """
        refuse_quantized(self)
        bad = count_nonfinite(self._oriented_weight(), self._adder(), +1.0)
        if bad:
            raise MergeError(f"merging adapter layer {self.name!r} would write {bad} NaN/Inf values "
                             f"into its {self.base_layer.weight.dtype} weight; nothing was merged")

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add ΔW into the base weight, in place and from the factors (idempotent).

        ``safe`` checks for NaN/Inf first. The sum is formed in float32 (float64 kept) and cast
        back, so a bf16/fp16 weight is rounded once.

        Raises:
            MergeError: with ``safe=True``, if the result would not be finite (nothing changes); a
                quantised base weight (:func:`moreft.quant.merge_quantized` merges into one).
        """
        if self.merged:
            return
        refuse_quantized(self)
        if safe:
            self.check_mergeable()
        add_delta_(self._oriented_weight(), self._adder(), +1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again, in place (idempotent); exact up to rounding."""
        if not self.merged:
            return
        add_delta_(self._oriented_weight(), self._adder(), -1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"
