"""The best MoRe (rectangular Monarch) approximation of a dense matrix: block-wise truncated SVD.

Which entries of ``ΔW = P1·blkdiag2·P2·blkdiag1`` (:mod:`moreft.ops.monarch`) each factor reaches:
the ``N*r`` middle coordinates ``m`` (the rows of the folded ``A``) each carry one rank-1 term.
Coordinate ``m`` reads input block ``k = m // r`` through row ``j = m % r`` of ``blkdiag1[k]`` and,
after the stride permutation, writes output block ``b = m % N`` (rows ``p*N + b``) through column
``a = m // N`` of ``blkdiag2[b]``. So sub-block ``(b, k)`` of ``ΔW`` (rows ``p*N + b``, columns
``k*I + i``) is a sum of ``c(b, k) = #{m : m % N == b, m // r == k}`` rank-1 terms, every ``m``
belongs to exactly one sub-block, and the sub-blocks share no parameter. Hence (Eckart-Young, block
by block) the closest MoRe product to ``W`` in Frobenius norm takes the rank-``c(b, k)`` truncated SVD
of each sub-block of ``W`` and loses sub-blocks with ``c(b, k) = 0``: the Monarch projection of Dao
et al. (2022, "Monarch", Section 3.3) for MoRe's rectangular blocks (MoRe paper, Appendix A.1: rank-1
sub-blocks when ``N >= r``, rank ``r / N`` ones when ``N < r``). The singular values are split evenly,
``sqrt(s)`` into each factor.

:func:`monarch_project` does all ``N*N`` SVDs as one batch on the zero-padded matrix;
:func:`monarch_project_reference` loops over the real (unpadded) sub-blocks one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BlockRule
from ..errors import ConfigError
from .monarch import block_shapes


def _check(weight: Tensor, nblocks: int, block_rank: int) -> None:
    if weight.dim() != 2:
        raise ConfigError(f"weight of shape {list(weight.shape)} must be a matrix (out, in)")
    for name, value in (("nblocks", nblocks), ("block_rank", block_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    if nblocks > weight.shape[1]:
        raise ConfigError(f"nblocks={nblocks} must be <= in_features={weight.shape[1]}")


def sub_block_terms(nblocks: int, block_rank: int) -> dict[tuple[int, int], list[int]]:
    """``{(b, k): [m, ...]}``: the middle coordinates of sub-block (output block b, input block k), in order."""
    terms: dict[tuple[int, int], list[int]] = {}
    for m in range(nblocks * block_rank):
        terms.setdefault((m % nblocks, m // block_rank), []).append(m)
    return terms


def _svd_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def monarch_project(
    weight: Tensor, nblocks: int, block_rank: int, rule: BlockRule = BlockRule.MOREFT
) -> tuple[Tensor, Tensor]:
    """Factors ``(blkdiag1 (N, r, I), blkdiag2 (N, O, r))`` whose MoRe product is closest to ``weight``.

    Args:
        weight: ``(out, in)`` dense matrix (any float dtype; the SVDs run in fp32, fp64 kept).
        nblocks: ``N`` asked for (``rule`` may keep fewer blocks, as the layer does).
        block_rank: ``r``, the rank of each block.
        rule: the block-shape rule (:func:`moreft.ops.monarch.block_shapes`).

    Returns:
        Factors in the SVD dtype, zero on padded rows/columns, with
        ``more_delta_weight(blkdiag1, blkdiag2, in, out)`` the Frobenius-optimal MoRe approximation.

    Raises:
        ConfigError: ``weight`` not a matrix, ``nblocks``/``block_rank`` not integers >= 1, or
            ``nblocks > in``.
    """
    _check(weight, nblocks, block_rank)
    out_f, in_f = weight.shape
    n, in_blk, out_blk = block_shapes(in_f, out_f, nblocks, rule)
    r = block_rank
    w = weight.detach().to(_svd_dtype(weight))
    w = F.pad(w, (0, n * in_blk - in_f, 0, n * out_blk - out_f))  # (N*O, N*I), zero-padded
    blocks = w.reshape(out_blk, n, n, in_blk).permute(1, 2, 0, 3)  # (N_b, N_k, O, I): rows p*N+b, cols k*I+i
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)  # (N, N, O, q), (N, N, q), (N, N, q, I)
    terms = sub_block_terms(n, r)
    most = max(len(ms) for ms in terms.values())
    q = s.shape[-1]
    if most > q:  # more terms than a block has singular values (official rules): the extra ones stay zero
        u, s, vh = F.pad(u, (0, most - q)), F.pad(s, (0, most - q)), F.pad(vh, (0, 0, 0, most - q))
    m = torch.arange(n * r)
    slot = torch.empty(n * r, dtype=torch.long)  # position of m among its sub-block's terms
    for ms in terms.values():
        slot[ms] = torch.arange(len(ms))
    b_idx, k_idx = m % n, m // r
    root = s[b_idx, k_idx, slot].sqrt()  # (N*r,)
    cols = u[b_idx, k_idx, :, slot] * root[:, None]  # (N*r, O): column a = m // N of blkdiag2[b]
    rows = vh[b_idx, k_idx, slot, :] * root[:, None]  # (N*r, I): row j = m % r of blkdiag1[k]
    blkdiag1 = torch.zeros(n, r, in_blk, dtype=w.dtype, device=w.device)
    blkdiag2 = torch.zeros(n, out_blk, r, dtype=w.dtype, device=w.device)
    blkdiag1[k_idx, m % r] = rows
    blkdiag2[b_idx, :, m // n] = cols
    real_in = torch.arange(n * in_blk, device=w.device).reshape(n, 1, in_blk) < in_f  # (N, 1, I)
    real_out = (
        torch.arange(out_blk, device=w.device)[None, :, None] * n
        + torch.arange(n, device=w.device)[:, None, None]
    ) < out_f  # (N, O, 1): row p*N + b
    return blkdiag1 * real_in, blkdiag2 * real_out


def monarch_project_reference(
    weight: Tensor, nblocks: int, block_rank: int, rule: BlockRule = BlockRule.MOREFT
) -> tuple[Tensor, Tensor]:
    """:func:`monarch_project` by a loop over the real sub-blocks, one SVD each (slow, for tests)."""
    _check(weight, nblocks, block_rank)
    out_f, in_f = weight.shape
    n, in_blk, out_blk = block_shapes(in_f, out_f, nblocks, rule)
    w = weight.detach().to(_svd_dtype(weight))
    blkdiag1 = torch.zeros(n, block_rank, in_blk, dtype=w.dtype)
    blkdiag2 = torch.zeros(n, out_blk, block_rank, dtype=w.dtype)
    for (b, k), ms in sub_block_terms(n, block_rank).items():
        rows = [p for p in range(out_blk) if p * n + b < out_f]  # real rows of output block b
        cols = [i for i in range(in_blk) if k * in_blk + i < in_f]  # real columns of input block k
        if not rows or not cols:
            continue
        sub = w[[p * n + b for p in rows]][:, [k * in_blk + i for i in cols]]  # (rows, cols)
        u, s, vh = torch.linalg.svd(sub, full_matrices=False)
        for t, m in enumerate(ms[: s.numel()]):
            root = s[t].sqrt()
            blkdiag2[b, rows, m // n] = u[:, t] * root
            blkdiag1[k, m % block_rank, cols] = vh[t] * root
    return blkdiag1, blkdiag2
