"""In-place merge arithmetic of the adapter layers: ``W ± ΔW`` with no weight-sized copy.

Each layer hands out a :data:`DeltaAdder` (``add(out, row0, alpha)``: ``out += alpha ·
ΔW[row0:row0 + len(out)]`` in place, ``out`` oriented ``(out_features, in_features)``) built from its
own factors: LoRA and MoRe add a low-rank product with ``addmm_`` / ``baddbmm_``, MoRA its placed
blocks, and only layers without structure build a dense ``ΔW``. A float32/float64 weight is
updated whole, in place; a bf16/fp16 weight (and the NaN/Inf check of ``merge(safe=True)``) goes by
row chunks of about 4 MiB in float32 so that no weight-sized float32 copy exists either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: ``add(out, row0, alpha)``: ``out (h, in) += alpha · ΔW[row0:row0 + h]`` in place.
DeltaAdder = Callable[[Tensor, int, float], None]

CHUNK_ELEMENTS = 1 << 20  # float32 elements per row chunk (4 MiB)


def accumulate_dtype(weight: Tensor) -> torch.dtype:
    """Merge arithmetic runs in float32, or float64 for a float64 weight."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def add_delta_(weight: Tensor, adder: DeltaAdder, alpha: float) -> None:
    """``weight (out, in) += alpha · ΔW`` in place (any strides, e.g. a Conv1D weight's ``.T``).

    Float32/float64 weights are updated in one call; others by float32 row chunks, cast back.
    """
    acc = accumulate_dtype(weight)
    if weight.dtype == acc:
        adder(weight, 0, alpha)
        return
    for lo, hi in _row_chunks(*weight.shape):
        chunk = weight[lo:hi].to(acc, copy=True)  # (h, in)
        adder(chunk, lo, alpha)
        weight[lo:hi].copy_(chunk)


def count_nonfinite(weight: Tensor, adder: DeltaAdder, alpha: float) -> int:
    """NaN/Inf count of ``weight + alpha · ΔW`` after the cast to the weight's dtype; writes nothing."""
    acc = accumulate_dtype(weight)
    bad = 0
    for lo, hi in _row_chunks(*weight.shape):
        chunk = weight[lo:hi].to(acc, copy=True)  # (h, in)
        adder(chunk, lo, alpha)
        bad += int((~torch.isfinite(chunk.to(weight.dtype))).sum())
    return bad


def dense_adder(delta: Tensor) -> DeltaAdder:
    """The adder of an explicit ``ΔW (out, in)`` (for layers without a cheaper structure)."""

    def add(out: Tensor, row0: int, alpha: float) -> None:
        out.add_(delta[row0 : row0 + out.shape[0]], alpha=alpha)

    return add


def lowrank_adder(b: Tensor, a: Tensor, scale: float) -> DeltaAdder:
    """The adder of ``ΔW = scale · B @ A`` with ``B (out, k)``, ``A (k, in)``: one ``addmm_``."""

    def add(out: Tensor, row0: int, alpha: float) -> None:
        out.addmm_(b[row0 : row0 + out.shape[0]], a, alpha=alpha * scale)  # (h, k) @ (k, in)

    return add


def blocked_lowrank_adder(b: Tensor, blkdiag1: Tensor) -> DeltaAdder:
    """The adder of MoRe's ``ΔW = B @ blkdiag(blkdiag1)`` when the blocks tile ``in`` exactly.

    Column block ``n`` of ΔW is ``B[:, n·r:(n+1)·r] @ blkdiag1[n]``: one ``baddbmm_`` over the
    ``N`` column blocks, ``1/N`` of the dense product's work.
    """
    nblocks, r, in_block = blkdiag1.shape

    def add(out: Tensor, row0: int, alpha: float) -> None:
        rows = out.shape[0]
        out_blocks = out.unflatten(1, (nblocks, in_block)).transpose(0, 1)  # (N, h, I)
        b_blocks = b[row0 : row0 + rows].unflatten(1, (nblocks, r)).transpose(0, 1)  # (N, h, r)
        out_blocks.baddbmm_(b_blocks, blkdiag1, alpha=alpha)

    return add
