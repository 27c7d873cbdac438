"""MoRA layer: one square high-rank matrix between parameter-free operators (MoRA, Section 4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import Method, MoRAConfig, MoRAOperator, SharingLayout
from ..errors import ConfigError
from ..ops.blocks import Span
from ..ops.mora import mora_blocks, mora_delta_weight, mora_reference, square_size
from ..ops.mora_fused import cached_rotation_tables, mora_delta_add_, mora_linear, mora_spans
from .base import AdapterLayer, DeltaAdder
from .linear import adapter_dtype


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
            raise ConfigError(
                f"r_hat={config.r_hat} must be <= max(in_features, out_features)="
                f"{max(in_features, out_features)} on {name!r}"
            )
        if config.r_hat > limit and (
            config.operator is MoRAOperator.TRUNCATION
            or (config.operator is MoRAOperator.SHARING and config.cap_r_hat)
        ):
            raise ConfigError(
                f"r_hat={config.r_hat} must be <= min(in_features, out_features)={limit} "
                f"for operator {config.operator.value!r} on {name!r}"
            )
        return config.r_hat
    r_hat = square_size(in_features, out_features, config.rank, config.r_hat_rounding)
    if config.operator is MoRAOperator.TRUNCATION or (
        config.operator is MoRAOperator.SHARING and config.cap_r_hat
    ):
        r_hat = min(r_hat, limit)
    if config.operator is MoRAOperator.ROTATION:
        r_hat = max(2, r_hat - r_hat % 2)
    return r_hat


class MoRALinear(AdapterLayer[MoRAConfig]):
    """``y = base(x) + f_decomp(M · f_comp(dropout(x)))`` with a zero-initialised ``matrix`` M.

    Per adapter: ``mora_matrix`` (the parameter), ``mora_r_hat``, and the SHARING groupings
    ``mora_sharing_layout`` (inputs) and ``mora_sharing_output_layout`` (outputs): plain attributes,
    so ReMoRA can switch them between merges.
    """

    method = Method.MORA
    prefix = "mora_"
    adapter_param_names = ("matrix",)
    mora_matrix: nn.ParameterDict
    other_param_names = (
        *AdapterLayer.other_param_names,
        "mora_r_hat",
        "mora_sharing_layout",
        "mora_sharing_output_layout",
    )

    matrix = property(
        lambda self: self.mora_matrix[self.resolve_adapter()], doc="The active adapter's square matrix."
    )
    r_hat = property(lambda self: self.mora_r_hat[self.resolve_adapter()], doc="The active adapter's r_hat.")
    operator = property(
        lambda self: self.adapter_configs[self.resolve_adapter()].operator, doc="The active operator."
    )

    @property
    def sharing_layout(self) -> SharingLayout:
        return self.mora_sharing_layout[self.resolve_adapter()]

    @sharing_layout.setter
    def sharing_layout(self, layout: SharingLayout) -> None:
        self.mora_sharing_layout[self.resolve_adapter()] = layout

    @property
    def sharing_output_layout(self) -> SharingLayout:
        return self.mora_sharing_output_layout[self.resolve_adapter()]

    @sharing_output_layout.setter
    def sharing_output_layout(self, layout: SharingLayout) -> None:
        self.mora_sharing_output_layout[self.resolve_adapter()] = layout

    def _new_params(self, config: MoRAConfig, adapter_name: str) -> dict[str, Tensor]:
        r_hat = resolve_r_hat(config, self.in_features, self.out_features, self.name)
        if not hasattr(self, "mora_r_hat"):
            self.mora_r_hat: dict[str, int] = {}
            self.mora_sharing_layout: dict[str, SharingLayout] = {}
            self.mora_sharing_output_layout: dict[str, SharingLayout] = {}
        self.mora_r_hat[adapter_name] = r_hat
        self.mora_sharing_layout[adapter_name] = config.sharing_layout
        self.mora_sharing_output_layout[adapter_name] = config.sharing_output_layout or config.sharing_layout
        weight = self._base_weight()
        return {"matrix": torch.empty(r_hat, r_hat, device=weight.device, dtype=adapter_dtype(weight))}

    @torch.no_grad()
    def _init_params(self, adapter_name: str, init_weights: bool) -> None:
        """MoRA needs no random factor: ``matrix`` starts at zero (random, for ΔW != 0)."""
        matrix = self.mora_matrix[adapter_name]
        if init_weights:
            matrix.zero_()
        else:
            nn.init.uniform_(matrix, -1.0 / math.sqrt(matrix.shape[0]), 1.0 / math.sqrt(matrix.shape[0]))

    def _op(self, adapter_name: str) -> tuple[MoRAOperator, SharingLayout, SharingLayout]:
        """``(operator, input layout, output layout)`` of one adapter."""
        return (
            self.adapter_configs[adapter_name].operator,
            self.mora_sharing_layout[adapter_name],
            self.mora_sharing_output_layout[adapter_name],
        )

    def _delta_weight(self, adapter_name: str) -> Tensor:
        return mora_delta_weight(
            self.mora_matrix[adapter_name], self.in_features, self.out_features, *self._op(adapter_name)
        )

    def _adapter_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        return mora_reference(
            self.adapter_dropout[adapter_name](x),
            self.mora_matrix[adapter_name],
            self.in_features,
            self.out_features,
            *self._op(adapter_name),
        )

    def block_form(self, adapter_name: str | None = None) -> tuple[Tensor, tuple[Span, ...]] | None:
        """``(blocks (c, r, r), spans)`` with ΔW their placement (``moreft.ops.blocks``); None for SHARING."""
        name = self.resolve_adapter(adapter_name)
        operator = self.adapter_configs[name].operator
        blocks = mora_blocks(self.mora_matrix[name], self.in_features, operator, cached_rotation_tables)
        spans = mora_spans(self.in_features, self.out_features, self.mora_r_hat[name], operator)
        if blocks is None or spans is None:
            return None
        return blocks, spans

    def _fused_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, adapter_name: str
    ) -> Tensor | None:
        if not self._fusable(adapter_name):
            return None
        return mora_linear(x, weight, bias, self.mora_matrix[adapter_name], *self._op(adapter_name))

    def _fusable(self, adapter_name: str) -> bool:
        """The fused SHARING ops take ``r_hat <= min(in, out)``; an uncapped one (``cap_r_hat=False``) runs the reference."""
        return self.adapter_configs[adapter_name].operator is not MoRAOperator.SHARING or self.mora_r_hat[
            adapter_name
        ] <= min(self.in_features, self.out_features)

    def _delta_adder(self, dtype: torch.dtype, adapter_name: str) -> DeltaAdder:
        if not self._fusable(adapter_name):
            return super()._delta_adder(dtype, adapter_name)
        matrix = self.mora_matrix[adapter_name].detach().to(dtype)
        operator, layout, output_layout = self._op(adapter_name)
        dense = None

        def add(out: Tensor, row0: int, alpha: float) -> None:
            nonlocal dense
            if row0 == 0 and out.shape[0] == self.out_features:  # the whole weight, in place, no dense ΔW
                mora_delta_add_(out, matrix, operator, layout, alpha, output_layout)
                return
            if dense is None:  # row chunks (low-precision weights): one dense ΔW, built once
                dense = mora_delta_add_(
                    matrix.new_zeros(self.out_features, self.in_features),
                    matrix,
                    operator,
                    layout,
                    output_layout=output_layout,
                )
            out.add_(dense[row0 : row0 + out.shape[0]], alpha=alpha)

        return add

    def extra_repr(self) -> str:
        layers = {
            a: f"r_hat={self.mora_r_hat[a]}, operator={c.operator.value}, "
            f"sharing_layout={self.mora_sharing_layout[a].value}, "
            f"sharing_output_layout={self.mora_sharing_output_layout[a].value}"
            for a, c in self.adapter_configs.items()
        }
        return f"{super().extra_repr()}, {layers}"
