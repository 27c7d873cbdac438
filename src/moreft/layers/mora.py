"""MoRA layer: one square high-rank matrix between parameter-free operators (MoRA, Section 4)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from ..config import Method, MoRAConfig, MoRAOperator, SharingLayout
from ..errors import ConfigError
from ..ops.blocks import Span, add_blocks_, blocks_linear, cyclic_spans, truncation_spans
from ..ops.mora import mora_delta_weight, mora_reference, rotate, rotation_tables, square_size
from .base import AdapterLayer, DeltaAdder
from .linear import adapter_dtype

_TABLES_CACHED = 64


@functools.lru_cache(maxsize=_TABLES_CACHED)
def _rotation_tables(n_chunks: int, r: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``rotation_tables``, built once per key (constants, never written to).

    Built outside inference mode even when first asked for inside it, so that a later training
    step may save them for backward.
    """
    with torch.inference_mode(False):
        return rotation_tables(n_chunks, r, device, dtype)


def resolve_r_hat(config: MoRAConfig, in_features: int, out_features: int, name: str = "") -> int:
    """The square size for one layer: explicit ``r_hat`` or ``sqrt((in + out) * rank)`` rounded.

    The rounding is ``config.r_hat_rounding`` (``moreft.ops.mora.square_size``); TRUNCATION, and
    SHARING unless ``cap_r_hat`` is false, are capped at ``min(in, out)``.

    Raises:
        ConfigError: an explicit ``r_hat`` above ``max(in, out)``, or above ``min(in, out)`` for
            TRUNCATION, or SHARING with ``cap_r_hat``.
    """
    limit = min(in_features, out_features)
    if config.r_hat is not None:
        if config.r_hat > max(in_features, out_features):
            raise ConfigError(f"r_hat={config.r_hat} must be <= max(in_features, out_features)="
                              f"{max(in_features, out_features)} on {name!r}")
        if config.r_hat > limit and (config.operator is MoRAOperator.TRUNCATION or (
                config.operator is MoRAOperator.SHARING and config.cap_r_hat)):
            raise ConfigError(f"r_hat={config.r_hat} must be <= min(in_features, out_features)={limit} "
                              f"for operator {config.operator.value!r} on {name!r}")
        return config.r_hat
    r_hat = square_size(in_features, out_features, config.rank, config.r_hat_rounding)
    if config.operator is MoRAOperator.TRUNCATION or (config.operator is MoRAOperator.SHARING and config.cap_r_hat):
        r_hat = min(r_hat, limit)
    if config.operator is MoRAOperator.ROTATION:
        r_hat = max(2, r_hat - r_hat % 2)
    return r_hat


class MoRALinear(AdapterLayer):
    """``y = base(x) + f_decomp(M · f_comp(dropout(x)))`` with a zero-initialised ``matrix``.

    ``sharing_layout`` (input grouping) and ``sharing_output_layout`` (output grouping) are
    buffer-free attributes so ReMoRA can switch them between merges.
    """

    method = Method.MORA
    adapter_param_names = ("matrix",)

    def __init__(self, base_layer: nn.Module, config: MoRAConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        self.r_hat = resolve_r_hat(config, self.in_features, self.out_features, name)
        self.operator = config.operator
        self.sharing_layout: SharingLayout = config.sharing_layout
        self.sharing_output_layout: SharingLayout = config.sharing_output_layout or config.sharing_layout
        weight = base_layer.weight
        self.matrix = nn.Parameter(
            torch.zeros(self.r_hat, self.r_hat, device=weight.device, dtype=adapter_dtype(weight)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ΔW = 0: MoRA needs no random factor, ``matrix`` starts at zero."""
        self.matrix.zero_()

    def delta_weight(self) -> Tensor:
        return mora_delta_weight(self.matrix, self.in_features, self.out_features,
                                 self.operator, self.sharing_layout, self.sharing_output_layout)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return mora_reference(self.dropout(x), self.matrix, self.in_features, self.out_features,
                              self.operator, self.sharing_layout, self.sharing_output_layout)

    def _block_form(self) -> tuple[Tensor, tuple[Span, ...]] | None:
        """``(blocks (c, r, r), spans)`` with ΔW their placement (``moreft.ops.blocks``); None for SHARING."""
        r, m = self.r_hat, self.matrix
        if self.operator is MoRAOperator.TRUNCATION:
            return m.unsqueeze(0), truncation_spans(r)  # (1, r, r)
        if self.operator is MoRAOperator.SHARING:
            return None
        c = math.ceil(self.in_features / r)
        if self.operator is MoRAOperator.ROTATION:
            cos, sin = _rotation_tables(c, r, m.device, m.dtype)  # (c, r) each
            blocks = rotate(m.unsqueeze(0), cos.unsqueeze(1), -sin.unsqueeze(1))  # (c, r, r): M·R_j
        else:
            blocks = m.unsqueeze(0).expand(c, r, r)  # (c, r, r)
        return blocks, cyclic_spans(self.in_features, self.out_features, r)

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        form = self._block_form()
        return None if form is None else blocks_linear(x, weight, bias, *form)

    def _delta_adder(self, dtype: torch.dtype) -> DeltaAdder:
        form = self._block_form()
        if form is None:
            return super()._delta_adder(dtype)
        blocks, spans = form
        blocks = blocks.detach().to(dtype)
        dense = None

        def add(out: Tensor, row0: int, alpha: float) -> None:
            nonlocal dense
            if row0 == 0 and out.shape[0] == self.out_features:
                add_blocks_(out, blocks, spans, alpha)  # the whole weight: blocks only, in place
                return
            if dense is None:  # row chunks (low-precision weights): one dense ΔW, built once
                dense = add_blocks_(blocks.new_zeros(self.out_features, self.in_features), blocks, spans)
            out.add_(dense[row0:row0 + out.shape[0]], alpha=alpha)

        return add

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_hat={self.r_hat}, operator={self.operator.value}, "
                f"sharing_layout={self.sharing_layout.value}, "
                f"sharing_output_layout={self.sharing_output_layout.value}")
