"""Rectangular Monarch products for MoRe (MoRe paper, Section 3 and Appendix G).

Notation: ``N = nblocks``, ``r = block_rank``, ``I = in_block = ceil(in / N)``,
``O = out_block = ceil(out / N)``, ``T`` = number of tokens (all leading dims flattened).
``blkdiag1`` has shape ``(N, r, I)`` and acts first on the input; ``blkdiag2`` has shape
``(N, O, r)``. The input is zero-padded to ``N * I`` and cut into ``N`` contiguous chunks; between
the factors sits the stride permutation of the pseudocode (``reshape(T, r, N).transpose``); the
output is interleaved (position ``p * N + b`` comes from block ``b``) and truncated to ``out``.

Two equal formulations live here:

* :func:`more_reference` is the Appendix G pseudocode, line for line (two bmm, two permutation
  copies). It defines what the factors mean, so factors trained with the authors' code mean the
  same thing here.
* :func:`fold_factors` folds both permutations into the factors once per call, giving a dense
  ``A (N*r, in)`` and ``B (out, N*r)`` with ``ΔW = B @ A``; :func:`more_forward` then needs two
  GEMMs and no permutation copy of any ``T``-sized tensor, forward or backward. ``(A, B)`` is also
  exactly a rank ``N*r`` LoRA, which is what :func:`moreft.export_lora` writes. The fold is one
  strided copy per factor (:func:`fold_more_a`, :func:`fold_more_b`, with their adjoints for the
  fused backward), used by every caller; :func:`fold_factors_reference` is its literal form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BlockRule
from . import ceil_div


def block_sizes(in_features: int, out_features: int, nblocks: int) -> tuple[int, int]:
    """Return ``(in_block, out_block) = (ceil(in / N), ceil(out / N))``."""
    return ceil_div(in_features, nblocks), ceil_div(out_features, nblocks)


def block_shapes(
    in_features: int, out_features: int, nblocks: int, rule: BlockRule = BlockRule.MOREFT
) -> tuple[int, int, int]:
    """``(blocks, in_block, out_block)`` of a MoRe layer asked for ``nblocks`` blocks under ``rule``.

    MOREFT keeps all ``N`` blocks of ``ceil(in / N)`` inputs and ``ceil(out / N)`` outputs. The
    OFFICIAL rules are the MoRe repository's ``MonarchLinear.__init__``: the same input block, then
    ``ceil(in / in_block)`` blocks (fully padded blocks dropped: in=20, N=8 gives 7 blocks of 3),
    and ``out_block = ceil(in_block * (out / in))`` evaluated in floating point exactly as there
    (11008 -> 14336 at N=4 gives 3585, not 3584), or for OFFICIAL_INT
    ``in_block * ceil(out / in)``. Every rule gives ``blocks * in_block >= in`` and
    ``blocks * out_block >= out``.
    """
    in_block = ceil_div(in_features, nblocks)
    if rule is BlockRule.MOREFT:
        return nblocks, in_block, ceil_div(out_features, nblocks)
    blocks = ceil_div(in_features, in_block)
    if rule is BlockRule.OFFICIAL:  # the authors' float expressions, kept as they wrote them
        return blocks, in_block, math.ceil(in_block * (out_features / in_features))
    return blocks, in_block, in_block * math.ceil(out_features / in_features)


def more_reference(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, out_features: int) -> Tensor:
    """MoRe adapter output ``x · ΔWᵀ``, computed literally as in the paper's pseudocode.

    Args:
        x: input of shape ``(..., in)``.
        blkdiag1: ``(N, r, I)`` first factor.
        blkdiag2: ``(N, O, r)`` second factor.
        out_features: ``out``; the ``N * O`` interleaved outputs are truncated to it.

    Returns:
        Tensor of shape ``(..., out)``.
    """
    nblocks, blk_r, in_blk = blkdiag1.shape
    out_blk = blkdiag2.shape[1]
    batch_shape, n = x.shape[:-1], x.shape[-1]
    x = F.pad(x, (0, nblocks * in_blk - n))  # (..., N*I), zero-padded
    x = x.reshape(-1, nblocks, in_blk).transpose(0, 1)  # (N, T, I)
    batch_dim = x.shape[1]
    out1 = torch.bmm(x, blkdiag1.transpose(-1, -2))  # (N, T, r)
    out1 = out1.transpose(0, 1).reshape(batch_dim, blk_r, nblocks)  # (T, r, N): stride permutation
    out1 = out1.transpose(-1, -2).contiguous().transpose(0, 1)  # (N, T, r)
    out2 = torch.bmm(out1, blkdiag2.transpose(-1, -2))  # (N, T, O)
    out2 = out2.permute(1, 2, 0).reshape(*batch_shape, out_blk * nblocks)  # (..., O*N) interleaved
    return out2[..., :out_features]


def fold_more_a(blkdiag1: Tensor, in_features: int) -> Tensor:
    """Dense ``A = blkdiag(blkdiag1)[:, :in]`` of shape ``(N·r, in)``, by one strided copy.

    Row ``k*r + j`` is rank ``j`` of block ``k``; the padded input columns are dropped.
    Differentiable (and fine under ``torch.func``); the copy is of parameter size.
    """
    nblocks, rank, in_block = blkdiag1.shape
    a = blkdiag1.new_zeros(nblocks * rank, nblocks * in_block)  # (N·r, N·I)
    a.view(nblocks, rank, nblocks, in_block).diagonal(dim1=0, dim2=2).copy_(
        blkdiag1.permute(1, 2, 0)
    )  # (r, I, N)
    return a[:, :in_features]


def fold_more_b(blkdiag2: Tensor, out_features: int) -> Tensor:
    """``B (out, N·r)`` with ``B[p·N + b, a·N + b] = blkdiag2[b, p, a]``, by one strided copy.

    The output interleave picks the row, the stride permutation picks the column; rows past
    ``out`` are dropped. Differentiable; the copy is of parameter size.
    """
    nblocks, out_block, rank = blkdiag2.shape
    b = blkdiag2.new_zeros(out_block * nblocks, rank * nblocks)  # (N·O, N·r)
    b.view(out_block, nblocks, rank, nblocks).diagonal(dim1=1, dim2=3).copy_(
        blkdiag2.permute(1, 2, 0)
    )  # (O, r, N)
    return b[:out_features]


def more_a_grad(da_padded: Tensor, blkdiag1: Tensor) -> Tensor:
    """``∂blkdiag1 (N, r, I)`` from a dense ``∂A (N·r, N·I)`` (columns past ``in`` zero): :func:`fold_more_a`'s adjoint."""
    nblocks, rank, in_block = blkdiag1.shape
    diag = da_padded.view(nblocks, rank, nblocks, in_block).diagonal(dim1=0, dim2=2)  # (r, I, N)
    return diag.permute(2, 0, 1).contiguous()  # (N, r, I)


def more_b_grad(db_t: Tensor, blkdiag2: Tensor) -> Tensor:
    """``∂blkdiag2 (N, O, r)`` from ``∂Bᵀ (N·r, N·O)`` (columns past ``out`` zero): :func:`fold_more_b`'s adjoint."""
    nblocks, out_block, rank = blkdiag2.shape
    diag = db_t.view(rank, nblocks, out_block, nblocks).diagonal(dim1=1, dim2=3)  # (r, O, N)
    return diag.permute(2, 1, 0).contiguous()  # (N, O, r)


def fold_factors(
    blkdiag1: Tensor, blkdiag2: Tensor, in_features: int, out_features: int
) -> tuple[Tensor, Tensor]:
    """Fold the permutations into dense factors ``A (N*r, in)`` and ``B (out, N*r)``.

    The one fold every caller uses (:func:`more_forward`, :func:`more_delta_weight`, the fused
    Function in :mod:`moreft.ops.fused`, merging and :func:`moreft.export_lora`), through
    :func:`fold_more_a` and :func:`fold_more_b`; :func:`fold_factors_reference` is its literal form.

    Returns:
        ``(A, B)`` with ``B @ A == ΔW`` of shape ``(out, in)``.
    """
    return fold_more_a(blkdiag1, in_features), fold_more_b(blkdiag2, out_features)


def fold_factors_reference(
    blkdiag1: Tensor, blkdiag2: Tensor, in_features: int, out_features: int
) -> tuple[Tensor, Tensor]:
    """:func:`fold_factors` written from its definition (slow; for the tests).

    ``A`` is ``blkdiag(blkdiag1)`` with the padded input columns dropped (row ``k*r + j`` is rank
    ``j`` of block ``k``). ``B[p*N + b, a*N + b] = blkdiag2[b, p, a]``: the output interleave
    picks the row, the stride permutation picks the column.
    """
    nblocks, blk_r, _ = blkdiag1.shape
    out_blk = blkdiag2.shape[1]
    a = torch.block_diag(*blkdiag1.unbind(0))[:, :in_features]  # (N*r, in)
    b = torch.diag_embed(blkdiag2.permute(1, 2, 0))  # (O, r, N, N): [p, a, b, b'] nonzero iff b == b'
    b = b.permute(0, 2, 1, 3).reshape(out_blk * nblocks, blk_r * nblocks)  # (O*N, r*N)
    return a, b[:out_features]


def more_forward(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, out_features: int) -> Tensor:
    """Fast MoRe adapter output ``x · ΔWᵀ`` through the folded factors (two GEMMs).

    Args:
        x: input of shape ``(..., in)``.
        blkdiag1: ``(N, r, I)`` first factor.
        blkdiag2: ``(N, O, r)`` second factor.
        out_features: ``out``.

    Returns:
        Tensor of shape ``(..., out)``, equal to :func:`more_reference`.
    """
    a, b = fold_factors(blkdiag1, blkdiag2, x.shape[-1], out_features)
    return F.linear(F.linear(x, a), b)  # (..., N*r) then (..., out)


def more_delta_weight(blkdiag1: Tensor, blkdiag2: Tensor, in_features: int, out_features: int) -> Tensor:
    """Dense ``ΔW`` of shape ``(out, in)`` from the folded factors (no identity forward)."""
    a, b = fold_factors(blkdiag1, blkdiag2, in_features, out_features)
    return b @ a  # (out, N*r) @ (N*r, in)
