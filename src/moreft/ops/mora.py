"""MoRA's compress / decompress operators and closed-form ΔW (MoRA paper, Section 4).

``r = r_hat``; ``M`` has shape ``(r, r)``; ``x`` has shape ``(..., in)``. Where ``r`` does not
divide ``in``, SHARING-STRIDED, DECOUPLE and ROTATION pad the input cyclically (padded position
``t`` reads ``x[t % in]``), as the authors' code does; SHARING-ADJACENT uses uneven groups
instead, also as the authors do. Outputs shorter than ``out`` are tiled, longer ones truncated.

:func:`mora_reference` applies the operators literally (Eq. 2). :func:`mora_delta_weight` builds
the equivalent dense ``ΔW (out, in)`` in closed form, in ``O(out * in + c * r^2)`` work, with no
identity-matrix forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..config import MoRAOperator, RHatRounding, SharingLayout
from . import ceil_div


def square_size(
    in_features: int, out_features: int, rank: int, rounding: RHatRounding = RHatRounding.FLOOR
) -> int:
    """``sqrt((in + out) * rank)`` as an integer: the square of LoRA-rank-``rank`` parameter parity.

    FLOOR is exact integer arithmetic (the paper's floor). ROUND is the authors' expression
    ``int(math.sqrt((in + out) * r) + 0.5)`` (kongds/MoRA ``LoraLayer.update_layer``), kept in
    floating point so that it gives their value on every input.
    """
    if rounding is RHatRounding.ROUND:
        return int(math.sqrt((in_features + out_features) * rank) + 0.5)
    return math.isqrt((in_features + out_features) * rank)


def _adjacent_groups(width: int, r: int, device: torch.device) -> Tensor:
    """Group id of each of ``width`` positions: ``m`` groups of ``width//r + 1``, then size ``width//r``."""
    small = width // r
    m = width - r * small  # number of big groups
    sizes = torch.tensor([small + 1] * m + [small] * (r - m), device=device)
    return torch.repeat_interleave(torch.arange(r, device=device), sizes)  # (width,)


def input_groups(
    in_features: int, r: int, layout: SharingLayout, device: torch.device
) -> tuple[Tensor, Tensor]:
    """SHARING compress as index maps over the (padded) input.

    Returns:
        ``(group, source)``: padded position ``t`` adds ``x[source[t]]`` to group ``group[t]``.
    """
    if layout is SharingLayout.ADJACENT:
        return _adjacent_groups(in_features, r, device), torch.arange(in_features, device=device)
    padded = ceil_div(in_features, r) * r
    t = torch.arange(padded, device=device)
    return t % r, t % in_features


def output_groups(out_features: int, r: int, layout: SharingLayout, device: torch.device) -> Tensor:
    """SHARING decompress: output row ``o`` copies row ``group[o]`` of ``M · compress(x)``."""
    if layout is SharingLayout.ADJACENT:
        return _adjacent_groups(out_features, r, device)
    return torch.arange(out_features, device=device) % r  # tile


def rotation_tables(n_chunks: int, r: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``(n_chunks, r)`` for chunk ``i`` and ``θ_j = 10000^(-2j/r)`` (Eq. 11)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, device=device, dtype=torch.float64) / r))  # (r/2,)
    freqs = torch.outer(torch.arange(n_chunks, device=device, dtype=torch.float64), inv_freq)  # (c, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (c, r)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE rotate-half on the last dim: ``x * cos + [-x2, x1] * sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def mora_blocks(
    matrix: Tensor,
    in_features: int,
    operator: MoRAOperator,
    tables: Callable[[int, int, torch.device, torch.dtype], tuple[Tensor, Tensor]] = rotation_tables,
) -> Tensor | None:
    """The blocks ``(c, r, r)`` whose placement is ΔW, or None for SHARING (differentiable in ``matrix``).

    TRUNCATION: ``M`` once (``c = 1``); DECOUPLE: ``M`` for each of ``c = ceil(in / r)`` chunks;
    ROTATION: ``M·R_j`` for chunk ``j`` (Eq. 11). The one copy of this rule: :func:`mora_delta_weight`
    places the blocks densely, :mod:`moreft.ops.mora_fused` in place and in the fused layer (with
    ``tables`` its cached :func:`rotation_tables`).
    """
    r = matrix.shape[0]
    if operator is MoRAOperator.TRUNCATION:
        return matrix.unsqueeze(0)  # (1, r, r)
    if operator is MoRAOperator.SHARING:
        return None
    c = ceil_div(in_features, r)
    if operator is MoRAOperator.ROTATION:
        cos, sin = tables(c, r, matrix.device, matrix.dtype)  # (c, r) each
        return rotate(matrix.unsqueeze(0), cos.unsqueeze(1), -sin.unsqueeze(1))  # (c, r, r): M·R_j
    return matrix.unsqueeze(0).expand(c, r, r)  # (c, r, r)


def _decouple_rows(out_features: int, n_chunks: int, r: int, device: torch.device) -> Tensor:
    """Flat position (chunk * r + row) that output ``o`` reads: truncated, or tiled if short."""
    return torch.arange(out_features, device=device) % (n_chunks * r)


def mora_reference(
    x: Tensor,
    matrix: Tensor,
    in_features: int,
    out_features: int,
    operator: MoRAOperator,
    layout: SharingLayout,
    output_layout: SharingLayout | None = None,
) -> Tensor:
    """MoRA adapter output ``f_decomp(M · f_comp(x))`` of shape ``(..., out)``, literally.

    SHARING groups the inputs by ``layout`` and the outputs by ``output_layout`` (default: the
    same); the mixed pairs are the authors' ``mora_type`` 3 (ADJACENT in, STRIDED out) and 4.
    """
    r = matrix.shape[0]
    dev = x.device
    if operator is MoRAOperator.TRUNCATION:
        y = x[..., :r] @ matrix.T  # (..., r)
        return torch.cat([y, y.new_zeros(*y.shape[:-1], out_features - r)], dim=-1)
    if operator is MoRAOperator.SHARING:
        group, source = input_groups(in_features, r, layout, dev)
        compressed = x.new_zeros(*x.shape[:-1], r).index_add_(-1, group, x[..., source])  # (..., r)
        y = compressed @ matrix.T  # (..., r)
        return y[..., output_groups(out_features, r, output_layout or layout, dev)]  # (..., out)
    c = ceil_div(in_features, r)
    xp = x[..., torch.arange(c * r, device=dev) % in_features]  # (..., c*r) cyclic pad
    chunks = xp.reshape(*x.shape[:-1], c, r)  # (..., c, r)
    if operator is MoRAOperator.ROTATION:
        cos, sin = rotation_tables(c, r, dev, x.dtype)
        chunks = rotate(chunks, cos, sin)  # (..., c, r)
    y = (chunks @ matrix.T).reshape(*x.shape[:-1], c * r)  # (..., c*r)
    return y[..., _decouple_rows(out_features, c, r, dev)]  # (..., out)


def mora_delta_weight(
    matrix: Tensor,
    in_features: int,
    out_features: int,
    operator: MoRAOperator,
    layout: SharingLayout,
    output_layout: SharingLayout | None = None,
) -> Tensor:
    """Closed-form ``ΔW (out, in)`` such that ``mora_reference(x) == x @ ΔW.T`` (same arguments)."""
    r = matrix.shape[0]
    dev = matrix.device
    if operator is MoRAOperator.TRUNCATION:
        delta = matrix.new_zeros(out_features, in_features)
        delta[:r, :r] = matrix
        return delta
    if operator is MoRAOperator.SHARING:
        group, source = input_groups(in_features, r, layout, dev)
        mc = matrix.new_zeros(r, in_features).index_add_(1, source, matrix[:, group])  # (r, in)
        return mc[output_groups(out_features, r, output_layout or layout, dev)]  # (out, in)
    blocks = mora_blocks(matrix, in_features, operator)  # (c, r, r): M, or M·R_i for ROTATION
    assert blocks is not None  # None only for SHARING, handled above
    c = blocks.shape[0]
    rows = _decouple_rows(out_features, c, r, dev)  # (out,) flat position read by each output
    row_chunk, row_in_chunk = rows // r, rows % r
    delta = matrix.new_zeros(out_features, in_features)
    for i in range(c):  # c = ceil(in / r) chunks, each a block of the block-diagonal ΔW
        hit = (row_chunk == i).nonzero().squeeze(1)  # (n_i,) output rows reading chunk i
        cols = torch.arange(i * r, (i + 1) * r, device=dev) % in_features  # (r,) cyclic
        delta[hit] = delta[hit].index_add(1, cols, blocks[i][row_in_chunk[hit]])
    return delta
