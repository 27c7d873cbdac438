"""MoRA's SHARING operator fused with the frozen base layer: group sums and broadcasts, no gather.

SHARING (``moreft.ops.mora``) compresses ``x (T, in)`` to ``h (T, r)`` by summing input groups,
multiplies by ``M (r, r)`` and decompresses by copying ``z = h Mᵀ`` to the output groups: ``ΔW =
D M C`` with ``C (r, in)`` the group sums and ``D (out, r)`` the copies. Both layouts cut a width
into :class:`Segment` runs, each a strided ``(T, count, width)`` view of the wide tensor:

* STRIDED: position ``t`` belongs to group ``t mod r`` (a *tile* segment: ``count`` copies of the
  ``r`` groups side by side); the input is padded cyclically (padded position ``in + t`` reads
  ``x[t]``: a second tile segment at position 0), the output is tiled and truncated;
* ADJACENT: ``r`` consecutive runs, the first ``in mod r`` of them one longer (a *repeat*
  segment: group ``group + i`` spans ``width`` consecutive positions).

So compressing is a sum over one dim of each view, and decompressing (and its transpose for
``∂x``) a broadcast ``add_`` into a view of ``y`` / ``∂x``: one pass over each token-sized tensor,
``O(T·(in + out))`` additions plus three ``T·r²`` products, instead of a gather and a scatter.
Unlike the block operators (:func:`moreft.ops.blocks.merged_pays`) it never runs through a
``W + ΔW`` temporary: measured at 1024² and 1024→4096 with T = 4096 (paired, interleaved), the
broadcast adds were 5-15% faster than forming ``W + ΔW`` twice per step, and need no
weight-sized buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SharingLayout
from . import dispatch

_LAYOUTS = (SharingLayout.STRIDED, SharingLayout.ADJACENT)  # index = the op's integer code


@dataclass(frozen=True)
class Segment:
    """Wide columns ``pos + i·width + u`` (``i < count``, ``u < width``) and the group each belongs to.

    ``repeat``: group ``group + i`` (a run of ``width`` equal groups); else group ``group + u`` (a tile).
    """

    pos: int
    group: int
    count: int
    width: int
    repeat: bool


@functools.cache
def segments(width: int, r: int, layout: SharingLayout, pad: bool) -> tuple[Segment, ...]:
    """The segments of a ``width``-wide tensor under ``layout`` (``pad``: cyclic input padding, STRIDED).

    Without ``pad`` a STRIDED width is tiled and truncated (the output side).
    """
    if layout is SharingLayout.ADJACENT:
        small, big = width // r, width % r  # ``big`` groups of ``small + 1``, then ``small``
        segs = [Segment(0, 0, big, small + 1, True), Segment(big * (small + 1), big, r - big, small, True)]
    else:
        whole, rest = divmod(width, r)
        segs = [Segment(0, 0, whole, r, False), Segment(whole * r, 0, 1, rest, False)]
        if pad and rest:  # padded positions width .. (whole + 1)·r - 1 read x[0 .. r - rest - 1]
            segs.append(Segment(0, rest, 1, r - rest, False))
    return tuple(s for s in segs if s.count and s.width)


def _view(wide: Tensor, s: Segment) -> Tensor:
    return wide[:, s.pos : s.pos + s.count * s.width].unflatten(1, (s.count, s.width))  # (T, count, width)


def _group_sums(view: Tensor, repeat: bool) -> Tensor:
    """Sums of a ``(T, count, width)`` view: over ``width`` (repeat, ``(T, count)``) or ``count`` (tile, ``(T, width)``).

    As products with a ones vector: on CPU several times faster than ``sum`` over a short dim.
    """
    if repeat:
        return torch.matmul(view, view.new_ones(view.shape[2]))  # (T, count)
    return torch.matmul(view.new_ones(view.shape[1]), view)  # (T, width)


def compress(wide: Tensor, segs: tuple[Segment, ...], r: int) -> Tensor:
    """``narrow (T, r)``: the sum of each group's columns of ``wide (T, width)``."""
    narrow: Tensor | None = None
    for s in segs:
        part = _group_sums(_view(wide, s), s.repeat)  # (T, count) or (T, width)
        if narrow is None and part.shape[1] == r:  # the first segment covers every group: no zeros
            narrow = part
            continue
        if narrow is None:
            narrow = wide.new_zeros(wide.shape[0], r)  # (T, r)
        narrow[:, s.group : s.group + part.shape[1]] += part
    return narrow if narrow is not None else wide.new_zeros(wide.shape[0], r)  # no segments: no sums


def expand_add_(wide: Tensor, narrow: Tensor, segs: tuple[Segment, ...]) -> Tensor:
    """``wide (T, width) += narrow (T, r)`` copied to each group's columns, in place (any strides)."""
    for s in segs:
        if s.repeat:
            _view(wide, s).add_(narrow[:, s.group : s.group + s.count].unsqueeze(2))  # (T, count, 1)
        else:
            _view(wide, s).add_(narrow[:, s.group : s.group + s.width].unsqueeze(1))  # (T, 1, width)
    return wide


def _segs(
    in_features: int, out_features: int, r: int, codes: Sequence[int]
) -> tuple[tuple[Segment, ...], ...]:
    """Input and output segments; ``codes`` = (input layout, output layout) as indices of ``_LAYOUTS``."""
    return segments(in_features, r, _LAYOUTS[codes[0]], True), segments(
        out_features, r, _LAYOUTS[codes[1]], False
    )


def _codes(layout: SharingLayout, output_layout: SharingLayout | None) -> tuple[int, int]:
    return _LAYOUTS.index(layout), _LAYOUTS.index(output_layout or layout)


def sharing_delta_add_(
    weight: Tensor,
    matrix: Tensor,
    layout: SharingLayout,
    alpha: float = 1.0,
    output_layout: SharingLayout | None = None,
) -> Tensor:
    """``weight (out, in) += alpha · ΔW`` of SHARING in place (any strides), with no dense ``ΔW``; returns it.

    ``output_layout`` groups the outputs (default: ``layout``; the authors' ``mora_type`` 3/4 mix them).
    """
    out_f, in_f = weight.shape
    r = matrix.shape[0]
    segs_in, segs_out = _segs(in_f, out_f, r, _codes(layout, output_layout))
    mc = expand_add_(matrix.new_zeros(r, in_f), matrix, segs_in)  # (r, in): M·C
    expand_add_(weight.T, (alpha * mc).T.to(weight.dtype), segs_out)  # rows of W: D·(M·C)
    return weight


def _forward(
    x2: Tensor, weight: Tensor, bias: Tensor | None, matrix: Tensor, codes: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """``y (T, out)`` and ``h = C x (T, r)`` (kept for ``∂M``)."""
    r = matrix.shape[0]
    segs_in, segs_out = _segs(x2.shape[1], weight.shape[0], r, codes)
    h = compress(x2, segs_in, r)  # (T, r)
    y = F.linear(x2, weight, bias)  # (T, out): the frozen layer
    return expand_add_(y, h @ matrix.T, segs_out), h  # z = h Mᵀ (T, r) copied to the output groups


def _sharing_forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    matrix: Tensor,
    _: None,
    ints: Sequence[int],
    floats: Sequence[float],
) -> tuple[Tensor, Tensor]:
    return _forward(x2, weight, bias, matrix, ints)


def _backward(
    g2: Tensor,
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    matrix: Tensor,
    _: None,
    h: Tensor,
    ints: Sequence[int],
    floats: Sequence[float],
    needs: tuple[bool, ...],
) -> dispatch.Grads:
    """Gradients of ``(x2, weight, bias, matrix)``: ``gz = Dᵀ g``, ``∂x = g W + Cᵀ(gz M)``, ``∂M = gzᵀ h``."""
    r = matrix.shape[0]
    segs_in, segs_out = _segs(x2.shape[1], weight.shape[0], r, ints)
    need_x, need_w, need_bias, need_m = needs[:4]
    dx = dm = None
    if need_m or need_x:
        gz = compress(g2, segs_out, r)  # (T, r)
        if need_x:
            dx = expand_add_(g2 @ weight, gz @ matrix, segs_in)  # (T, in) += Cᵀ(gz M)
        if need_m:
            dm = gz.T @ h  # (r, r)
    dw, dbias = dispatch.base_grads(g2, x2, need_w, need_bias)
    return dx, dw, dbias, dm, None


SHARING = dispatch.register(
    dispatch.FusedImpl(
        "sharing_linear",
        _sharing_forward,
        _backward,
        lambda tokens, weight, matrix, _, ints: (tokens, matrix.shape[0]),
    )
)


def sharing_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    matrix: Tensor,
    layout: SharingLayout,
    output_layout: SharingLayout | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias) + mora_reference(x, matrix, ..., SHARING, layout)``, fused.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` (a transposed view is fine).
        bias: ``(out,)`` or None.
        matrix: ``M (r, r)``, ``r <= min(in, out)``.
        layout: STRIDED or ADJACENT groups (inputs, and outputs unless ``output_layout`` is given).
        output_layout: the output grouping when it differs (the authors' ``mora_type`` 3/4).

    Returns:
        ``(..., out)``.
    """
    return dispatch.apply(SHARING, x, weight, bias, matrix, None, _codes(layout, output_layout))
