"""MoRA layer: one square high-rank matrix between parameter-free operators (MoRA, Section 4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import Method, MoRAConfig, MoRAOperator, SharingLayout
from ..errors import ConfigError
from ..ops.blocks import Span
from ..ops.mora import mora_delta_weight, mora_reference
from ..ops.mora_fused import mora_blocks, mora_delta_add_, mora_linear, mora_spans
from .base import AdapterLayer, DeltaAdder
from .linear import adapter_dtype

_BOUNDED = (MoRAOperator.TRUNCATION, MoRAOperator.SHARING)


def resolve_r_hat(config: MoRAConfig, in_features: int, out_features: int, name: str = "") -> int:
    """The square size for one layer: explicit ``r_hat`` or ``floor(sqrt((in + out) * rank))``.

    Raises:
        ConfigError: an explicit ``r_hat`` above ``max(in, out)``, or above ``min(in, out)`` for
            TRUNCATION or SHARING.
    """
    limit = min(in_features, out_features)
    if config.r_hat is not None:
        if config.r_hat > max(in_features, out_features):
            raise ConfigError(f"r_hat={config.r_hat} must be <= max(in_features, out_features)="
                              f"{max(in_features, out_features)} on {name!r}")
        if config.operator in _BOUNDED and config.r_hat > limit:
            raise ConfigError(f"r_hat={config.r_hat} must be <= min(in_features, out_features)={limit} "
                              f"for operator {config.operator.value!r} on {name!r}")
        return config.r_hat
    r_hat = math.isqrt((in_features + out_features) * config.rank)
    if config.operator in _BOUNDED:
        r_hat = min(r_hat, limit)
    if config.operator is MoRAOperator.ROTATION:
        r_hat = max(2, r_hat - r_hat % 2)
    return r_hat


class MoRALinear(AdapterLayer):
    """``y = base(x) + f_decomp(M · f_comp(dropout(x)))`` with a zero-initialised ``matrix``.

    ``sharing_layout`` is a buffer-free attribute so ReMoRA can switch it between merges.
    """

    method = Method.MORA
    adapter_param_names = ("matrix",)

    def __init__(self, base_layer: nn.Module, config: MoRAConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        self.r_hat = resolve_r_hat(config, self.in_features, self.out_features, name)
        self.operator = config.operator
        self.sharing_layout: SharingLayout = config.sharing_layout
        weight = base_layer.weight
        self.matrix = nn.Parameter(
            torch.zeros(self.r_hat, self.r_hat, device=weight.device, dtype=adapter_dtype(weight)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ΔW = 0: MoRA needs no random factor, ``matrix`` starts at zero."""
        self.matrix.zero_()

    def delta_weight(self) -> Tensor:
        return mora_delta_weight(self.matrix, self.in_features, self.out_features,
                                 self.operator, self.sharing_layout)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return mora_reference(self.dropout(x), self.matrix, self.in_features, self.out_features,
                              self.operator, self.sharing_layout)

    def _block_form(self) -> tuple[Tensor, tuple[Span, ...]] | None:
        """``(blocks (c, r, r), spans)`` with ΔW their placement (``moreft.ops.blocks``); None for SHARING."""
        blocks = mora_blocks(self.matrix, self.in_features, self.operator)
        if blocks is None:
            return None
        return blocks, mora_spans(self.in_features, self.out_features, self.r_hat, self.operator)

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return mora_linear(x, weight, bias, self.matrix, self.operator, self.sharing_layout)

    def _delta_adder(self, dtype: torch.dtype) -> DeltaAdder:
        matrix = self.matrix.detach().to(dtype)
        dense = None

        def add(out: Tensor, row0: int, alpha: float) -> None:
            nonlocal dense
            if row0 == 0 and out.shape[0] == self.out_features:  # the whole weight, in place, no dense ΔW
                mora_delta_add_(out, matrix, self.operator, self.sharing_layout, alpha)
                return
            if dense is None:  # row chunks (low-precision weights): one dense ΔW, built once
                dense = mora_delta_add_(matrix.new_zeros(self.out_features, self.in_features), matrix,
                                        self.operator, self.sharing_layout)
            out.add_(dense[row0:row0 + out.shape[0]], alpha=alpha)

        return add

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_hat={self.r_hat}, operator={self.operator.value}, "
                f"sharing_layout={self.sharing_layout.value}")
