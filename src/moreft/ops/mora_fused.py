"""MoRA's fused layer for every operator: one entry point over :mod:`.blocks` and :mod:`.sharing`.

TRUNCATION, DECOUPLE and ROTATION place copies of ``c`` square blocks (``M``, or ``M·R_j`` for
ROTATION) and run through :func:`moreft.ops.blocks.blocks_linear`; SHARING runs through
:func:`moreft.ops.sharing.sharing_linear`. Both are exact against
:func:`moreft.ops.mora.mora_reference` (outputs and all gradients) and run under
``torch.compile(fullgraph=True)`` as custom ops (:mod:`moreft.ops.dispatch`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..config import MoRAOperator, SharingLayout
from .blocks import Span, add_blocks_, blocks_linear, spans_of
from .mora import mora_blocks, rotation_tables
from .sharing import sharing_delta_add_, sharing_linear

_TABLES_CACHED = 64


@functools.lru_cache(maxsize=_TABLES_CACHED)
def _tables(n_chunks: int, r: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):  # a later training step may save them for backward
        return rotation_tables(n_chunks, r, device, dtype)


def cached_rotation_tables(
    n_chunks: int, r: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """:func:`moreft.ops.mora.rotation_tables`, built once per key in eager mode (constants, never written).

    Under ``torch.compile`` they are built in the graph instead (constants the compiler folds), so
    that dynamo never meets the cache.
    """
    if torch.compiler.is_compiling():
        return rotation_tables(n_chunks, r, device, dtype)
    return _tables(n_chunks, r, device, dtype)


def clear_rotation_tables() -> None:
    """Drop the cached tables (tests)."""
    _tables.cache_clear()


def mora_spans(
    in_features: int, out_features: int, r: int, operator: MoRAOperator
) -> tuple[Span, ...] | None:
    """Where :func:`moreft.ops.mora.mora_blocks` go in ΔW (``moreft.ops.blocks``); None for SHARING."""
    if operator is MoRAOperator.SHARING:
        return None
    return spans_of(in_features, out_features, r, operator is not MoRAOperator.TRUNCATION)


def mora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    matrix: Tensor,
    operator: MoRAOperator,
    layout: SharingLayout,
    output_layout: SharingLayout | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias) + mora_reference(x, matrix, in, out, operator, layout, output_layout)``, fused.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` (a transposed view is fine).
        bias: ``(out,)`` or None.
        matrix: ``M (r, r)``.
        operator: any MoRA operator.
        layout: the SHARING layout (ignored by the others).
        output_layout: SHARING's output grouping when it differs from ``layout``.

    Returns:
        ``(..., out)``.
    """
    if operator is MoRAOperator.SHARING:
        return sharing_linear(x, weight, bias, matrix, layout, output_layout)
    blocks = mora_blocks(matrix, weight.shape[1], operator, cached_rotation_tables)
    assert blocks is not None  # None only for SHARING, handled above
    return blocks_linear(x, weight, bias, blocks, operator is not MoRAOperator.TRUNCATION)


def mora_delta_add_(
    weight: Tensor,
    matrix: Tensor,
    operator: MoRAOperator,
    layout: SharingLayout,
    alpha: float = 1.0,
    output_layout: SharingLayout | None = None,
) -> Tensor:
    """``weight (out, in) += alpha · ΔW`` in place (any strides), from ``M`` with no dense ``ΔW``; returns it."""
    if operator is MoRAOperator.SHARING:
        return sharing_delta_add_(weight, matrix, layout, alpha, output_layout)
    out_f, in_f = weight.shape
    blocks = mora_blocks(matrix, in_f, operator, cached_rotation_tables)
    spans = mora_spans(in_f, out_f, matrix.shape[0], operator)
    assert blocks is not None and spans is not None  # None only for SHARING, handled above
    return add_blocks_(weight, blocks, spans, alpha)
