"""MoRA layer: one square high-rank matrix between parameter-free operators (MoRA, Section 4)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from ..config import Method, MoRAConfig, MoRAOperator, SharingLayout
from ..errors import ConfigError
from ..ops.blocks import Span, add_blocks_, blocks_linear, cyclic_spans, truncation_spans
from ..ops.mora import mora_delta_weight, mora_reference, rotate, rotation_tables
from .base import AdapterLayer, DeltaAdder
from .linear import adapter_dtype

_BOUNDED = (MoRAOperator.TRUNCATION, MoRAOperator.SHARING)
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
    """``y = base(x) + f_decomp(M · f_comp(dropout(x)))`` with a zero-initialised ``matrix`` M.

    Per adapter: ``mora_matrix`` (the parameter), ``mora_r_hat`` and ``mora_sharing_layout`` (a
    plain attribute, so ReMoRA can switch it between merges).
    """

    method = Method.MORA
    prefix = "mora_"
    adapter_param_names = ("matrix",)
    other_param_names = (*AdapterLayer.other_param_names, "mora_r_hat", "mora_sharing_layout")

    matrix = property(lambda self: self.mora_matrix[self._one()], doc="The active adapter's square matrix.")
    r_hat = property(lambda self: self.mora_r_hat[self._one()], doc="The active adapter's r_hat.")
    operator = property(lambda self: self.adapter_configs[self._one()].operator, doc="The active operator.")

    @property
    def sharing_layout(self) -> SharingLayout:
        return self.mora_sharing_layout[self._one()]

    @sharing_layout.setter
    def sharing_layout(self, layout: SharingLayout) -> None:
        self.mora_sharing_layout[self._one()] = layout

    def _new_params(self, config: MoRAConfig, adapter_name: str) -> dict[str, Tensor]:
        r_hat = resolve_r_hat(config, self.in_features, self.out_features, self.name)
        if not hasattr(self, "mora_r_hat"):
            self.mora_r_hat: dict[str, int] = {}
            self.mora_sharing_layout: dict[str, SharingLayout] = {}
        self.mora_r_hat[adapter_name] = r_hat
        self.mora_sharing_layout[adapter_name] = config.sharing_layout
        weight = self.base_layer.weight
        return {"matrix": torch.empty(r_hat, r_hat, device=weight.device, dtype=adapter_dtype(weight))}

    @torch.no_grad()
    def _init_params(self, adapter_name: str, init_weights: bool) -> None:
        """MoRA needs no random factor: ``matrix`` starts at zero (random, for ΔW != 0)."""
        matrix = self.mora_matrix[adapter_name]
        if init_weights:
            matrix.zero_()
        else:
            nn.init.uniform_(matrix, -1.0 / math.sqrt(matrix.shape[0]), 1.0 / math.sqrt(matrix.shape[0]))

    def _op(self, adapter_name: str) -> tuple[MoRAOperator, SharingLayout]:
        return self.adapter_configs[adapter_name].operator, self.mora_sharing_layout[adapter_name]

    def _delta_weight(self, adapter_name: str) -> Tensor:
        return mora_delta_weight(self.mora_matrix[adapter_name], self.in_features, self.out_features,
                                 *self._op(adapter_name))

    def _adapter_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        return mora_reference(self.adapter_dropout[adapter_name](x), self.mora_matrix[adapter_name],
                              self.in_features, self.out_features, *self._op(adapter_name))

    def _block_form(self, adapter_name: str | None = None) -> tuple[Tensor, tuple[Span, ...]] | None:
        """``(blocks (c, r, r), spans)`` with ΔW their placement (``moreft.ops.blocks``); None for SHARING."""
        name = self._one(adapter_name)
        operator, m = self.adapter_configs[name].operator, self.mora_matrix[name]
        r = m.shape[0]
        if operator is MoRAOperator.TRUNCATION:
            return m.unsqueeze(0), truncation_spans(r)  # (1, r, r)
        if operator is MoRAOperator.SHARING:
            return None
        c = math.ceil(self.in_features / r)
        if operator is MoRAOperator.ROTATION:
            cos, sin = _rotation_tables(c, r, m.device, m.dtype)  # (c, r) each
            blocks = rotate(m.unsqueeze(0), cos.unsqueeze(1), -sin.unsqueeze(1))  # (c, r, r): M·R_j
        else:
            blocks = m.unsqueeze(0).expand(c, r, r)  # (c, r, r)
        return blocks, cyclic_spans(self.in_features, self.out_features, r)

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, adapter_name: str) -> Tensor | None:
        form = self._block_form(adapter_name)
        return None if form is None else blocks_linear(x, weight, bias, *form)

    def _delta_adder(self, dtype: torch.dtype, adapter_name: str) -> DeltaAdder:
        form = self._block_form(adapter_name)
        if form is None:
            return super()._delta_adder(dtype, adapter_name)
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
        layers = {a: f"r_hat={self.mora_r_hat[a]}, operator={c.operator.value}, "
                     f"sharing_layout={self.mora_sharing_layout[a].value}" for a, c in self.adapter_configs.items()}
        return f"{super().extra_repr()}, {layers}"
