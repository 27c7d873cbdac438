"""ΔW made of placed copies of small square blocks, fused with the frozen base layer (MoRA).

MoRA's TRUNCATION, DECOUPLE and ROTATION operators (``moreft.ops.mora``) all give a ``ΔW (out,
in)`` that is zero except for copies of ``c`` blocks ``B_j (r, r)`` (``r = r_hat``): DECOUPLE has
``B_j = M``, ROTATION ``B_j = M·R_j``, TRUNCATION one block ``M`` at the top left. Chunk ``j``
reads input columns ``(j·r + u) mod in`` (cyclic padding) and writes output rows
``t·c·r + j·r + s`` for every tile ``t`` (tiling when ``out > c·r``, truncation at ``out``). A
:class:`Span` describes a run of such placements as rectangles, so that

* the fused layer (:func:`blocks_linear`) runs ``y = x Wᵀ + b + x ΔWᵀ`` and its backward as a few
  strided ``baddbmm_`` calls on views of ``x``, ``y``, ``∂x`` (no gather, no padding copy, no
  token-sized temporary); when ``T >= 2·in`` it instead runs ``y`` and ``∂x`` through ``W + ΔW``
  (a parameter-sized temporary), which removes two of MoRA's three ``T·out·r`` products; and
* a merge adds the blocks into ``W`` in place (:func:`add_blocks_`), with no dense ``ΔW``.

SHARING sums input groups and is not of this form: :mod:`moreft.ops.sharing` fuses it.
Like every fused op, :func:`blocks_linear` is an autograd Function in eager mode and a custom op
under ``torch.compile`` (:mod:`moreft.ops.dispatch`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ceil_div, dispatch


@dataclass(frozen=True)
class Span:
    """``count`` consecutive blocks from ``block``, each cut to ``[row0:row1, col0:col1]``.

    Block ``block + i`` lands at output rows ``out0 + i·r + [0, row1 - row0)`` and reads input
    columns ``in0 + i·r + [0, col1 - col0)``; ``count > 1`` only for whole blocks.
    """

    block: int
    count: int
    row0: int
    row1: int
    col0: int
    col1: int
    out0: int
    in0: int


@functools.cache
def cyclic_spans(in_features: int, out_features: int, r: int) -> tuple[Span, ...]:
    """The spans of DECOUPLE / ROTATION: ``c = ceil(in / r)`` chunks, cyclic input, tiled output.

    Whole blocks that sit on the diagonal of one tile are grouped into one span; a chunk cut by
    ``out`` (fewer rows) or by the cyclic wrap (its columns in two or more runs) gets its own.
    """
    c = ceil_div(in_features, r)
    period = c * r
    spans: list[Span] = []
    for tile0 in range(0, out_features, period):
        run_start = None
        for j in range(c + 1):
            out0 = tile0 + j * r
            whole = j < c and out0 + r <= out_features and (j + 1) * r <= in_features
            if whole and run_start is None:
                run_start = j
            if not whole and run_start is not None:
                spans.append(Span(run_start, j - run_start, 0, r, 0, r, tile0 + run_start * r, run_start * r))
                run_start = None
            if whole or j == c or out0 >= out_features:
                continue
            nrows = min(r, out_features - out0)
            u = 0
            while u < r:  # the chunk's columns as runs of consecutive inputs (cyclic wrap)
                col = (j * r + u) % in_features
                run = min(r - u, in_features - col)
                spans.append(Span(j, 1, 0, nrows, u, u + run, out0, col))
                u += run
    return tuple(spans)


@functools.cache
def truncation_spans(r: int) -> tuple[Span, ...]:
    """TRUNCATION: ``ΔW[:r, :r] = M`` and zero elsewhere (one block)."""
    return (Span(0, 1, 0, r, 0, r, 0, 0),)


def _view(t: Tensor, first: int, count: int, stride: int, width: int) -> Tensor:
    """Columns ``first + i·stride + [0, width)`` of ``t (T, n)`` as ``(count, T, width)``, a view.

    ``count > 1`` only for whole blocks (``width == stride``).
    """
    if count == 1:
        return t[:, first : first + width].unsqueeze(0)  # (1, T, width)
    return t[:, first : first + count * stride].unflatten(1, (count, stride)).transpose(0, 1)  # (count, T, r)


def _rows(t: Tensor, s: Span, r: int) -> Tensor:
    return _view(t, s.out0, s.count, r, s.row1 - s.row0)  # (count, T, rows)


def _cols(t: Tensor, s: Span, r: int) -> Tensor:
    return _view(t, s.in0, s.count, r, s.col1 - s.col0)  # (count, T, cols)


def _sub(blocks: Tensor, s: Span) -> Tensor:
    return blocks[s.block : s.block + s.count, s.row0 : s.row1, s.col0 : s.col1]  # (count, rows, cols)


def merged_pays(tokens: int, in_features: int) -> bool:
    """Run the products through ``W + ΔW`` (one GEMM each) rather than add the blocks' products.

    Forming ``W + ΔW`` costs a pass over ``out·in`` weights, the block products ``T·out·r``
    multiply-adds and a pass over a ``T``-sized tensor each; the former is cheaper once
    ``T >= 2·in``, where ``W + ΔW`` is also at most half the size of the output and of ``∂x``.
    """
    return 2 * in_features <= tokens


def add_blocks_(weight: Tensor, blocks: Tensor, spans: tuple[Span, ...], alpha: float = 1.0) -> Tensor:
    """``weight (out, in) += alpha · ΔW`` in place (any strides): one strided ``add_`` per span; returns ``weight``."""
    r = blocks.shape[-1]
    for s in spans:
        sub = _sub(blocks, s).to(weight.dtype)  # (count, rows, cols)
        rows, cols = s.row1 - s.row0, s.col1 - s.col0
        if s.count == 1:
            weight[s.out0 : s.out0 + rows, s.in0 : s.in0 + cols].add_(sub[0], alpha=alpha)
            continue
        square = weight[
            s.out0 : s.out0 + s.count * r, s.in0 : s.in0 + s.count * r
        ]  # whole blocks on its diagonal
        diagonal = (
            square.unflatten(0, (s.count, r)).unflatten(2, (s.count, r)).diagonal(dim1=0, dim2=2)
        )  # (r, r, count)
        diagonal.add_(sub.permute(1, 2, 0), alpha=alpha)
    return weight


def _merged(weight: Tensor, blocks: Tensor, spans: tuple[Span, ...]) -> Tensor:
    """``W + ΔW (out, in)``, a parameter-sized temporary."""
    return add_blocks_(weight.clone(memory_format=torch.contiguous_format), blocks, spans)


def _forward(
    x2: Tensor, weight: Tensor, bias: Tensor | None, blocks: Tensor, spans: tuple[Span, ...]
) -> Tensor:
    """``y = x (W + ΔW)ᵀ + bias`` for ``x2 (T, in)``: through ``W + ΔW`` when that pays, else in place."""
    r = blocks.shape[-1]
    if merged_pays(x2.shape[0], x2.shape[1]):
        return F.linear(x2, _merged(weight, blocks, spans), bias)
    y = F.linear(x2, weight, bias)  # (T, out)
    for s in spans:
        _rows(y, s, r).baddbmm_(_cols(x2, s, r), _sub(blocks, s).transpose(1, 2))
    return y


def spans_of(in_features: int, out_features: int, r: int, cyclic: bool) -> tuple[Span, ...]:
    """The placement of DECOUPLE / ROTATION (``cyclic``) or TRUNCATION blocks of size ``r``."""
    return cyclic_spans(in_features, out_features, r) if cyclic else truncation_spans(r)


def _blocks_forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    blocks: Tensor,
    _: None,
    ints: Sequence[int],
    floats: Sequence[float],
) -> tuple[Tensor, Tensor]:
    spans = spans_of(x2.shape[1], weight.shape[0], blocks.shape[-1], bool(ints[0]))
    return _forward(x2, weight, bias, blocks, spans), x2.new_empty(0)  # nothing kept


def _blocks_backward(
    g2: Tensor,
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    blocks: Tensor,
    _: None,
    saved: Tensor,
    ints: Sequence[int],
    floats: Sequence[float],
    needs: tuple[bool, ...],
) -> dispatch.Grads:
    """Gradients of ``(x2, weight, bias, blocks)``."""
    spans = spans_of(x2.shape[1], weight.shape[0], blocks.shape[-1], bool(ints[0]))
    need_x, need_w, need_bias, need_blocks = needs[:4]
    r = blocks.shape[-1]
    dx = dblocks = None
    if need_x and merged_pays(x2.shape[0], x2.shape[1]):
        dx = g2 @ _merged(weight, blocks, spans)  # (T, in)
    elif need_x:
        dx = g2 @ weight  # (T, in): what the frozen layer computes anyway
        for s in spans:
            _cols(dx, s, r).baddbmm_(_rows(g2, s, r), _sub(blocks, s))
    if need_blocks:
        dblocks = torch.zeros_like(blocks)  # (c, r, r)
        for s in spans:
            _sub(dblocks, s).baddbmm_(_rows(g2, s, r).transpose(1, 2), _cols(x2, s, r))
    dw, dbias = dispatch.base_grads(g2, x2, need_w, need_bias)
    return dx, dw, dbias, dblocks, None


BLOCKS = dispatch.register(
    dispatch.FusedImpl(
        "blocks_linear", _blocks_forward, _blocks_backward, lambda tokens, weight, blocks, _, ints: (0,)
    )
)


def blocks_linear(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: Tensor, cyclic: bool) -> Tensor:
    """``F.linear(x, weight + ΔW, bias)`` with ``ΔW`` = ``blocks (c, r, r)`` placed by ``spans``, fused.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` (a transposed view is fine).
        bias: ``(out,)`` or None.
        blocks: ``(c, r, r)``; its gradient comes back in that shape.
        cyclic: the blocks are placed by :func:`cyclic_spans` (DECOUPLE, ROTATION), else by
            :func:`truncation_spans` (TRUNCATION, ``c = 1``).

    Returns:
        ``(..., out)``.
    """
    return dispatch.apply(BLOCKS, x, weight, bias, blocks, None, (int(cyclic),))
