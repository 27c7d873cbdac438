"""The one table that drives the shared tests: every method and variant, on every shape.

An entry is ``(variant id, method config, shapes, tolerances)``; :data:`CASES` expands it into one
case per shape. Shapes are ``(in_features, out_features)``: square, in < out, in > out, and
widths that neither ``nblocks`` nor MoRA's ``r_hat`` divide. Tolerances belong to the method
(MoRA's rotation tables and SVD make it a little looser than the pure-GEMM methods).

Besides the table, this module holds the *independent* oracles the tests compare against:
the parameter-count formulas, MoRA's ``r_hat`` per case (a hand-computed table) and the expected
rank of ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from moreft import (
    AdapterConfig,
    Composition,
    InitMode,
    LoRAConfig,
    Method,
    MoRAConfig,
    MoRAOperator,
    MoReConfig,
    SharingLayout,
)

TARGET = ("lin",)  # the adapted layer of conftest.TinyNet
SHAPES = ((24, 24), (20, 36), (36, 20), (23, 37))


@dataclass(frozen=True)
class Tolerance:
    """``rtol`` / ``atol`` per dtype; ``atol`` is relative to the expected tensor's max magnitude."""

    rtol32: float
    atol32: float
    rtol64: float = 1e-10
    atol64: float = 1e-12

    def of(self, dtype: torch.dtype) -> tuple[float, float]:
        if dtype == torch.float64:
            return self.rtol64, self.atol64
        return self.rtol32, self.atol32


MORE_TOL = Tolerance(rtol32=1e-5, atol32=2e-6)
MORA_TOL = Tolerance(rtol32=2e-5, atol32=5e-6)
LORA_TOL = Tolerance(rtol32=1e-5, atol32=2e-6)


@dataclass(frozen=True)
class Entry:
    variant: str
    config: AdapterConfig
    shapes: tuple[tuple[int, int], ...]
    tol: Tolerance


def _mora(operator: MoRAOperator, layout: SharingLayout = SharingLayout.STRIDED, **kw) -> MoRAConfig:
    return MoRAConfig(target_modules=TARGET, operator=operator, sharing_layout=layout, **kw)


TEST_CASES: tuple[Entry, ...] = (
    Entry("more-N4r2", MoReConfig(target_modules=TARGET, nblocks=4, block_rank=2), SHAPES, MORE_TOL),
    Entry("more-N4r4", MoReConfig(target_modules=TARGET, nblocks=4, block_rank=4), SHAPES, MORE_TOL),
    Entry("more-N4r1", MoReConfig(target_modules=TARGET, nblocks=4, block_rank=1), SHAPES, MORE_TOL),
    Entry("more-N3r3", MoReConfig(target_modules=TARGET, nblocks=3, block_rank=3), SHAPES, MORE_TOL),
    Entry("more-N1r4", MoReConfig(target_modules=TARGET, nblocks=1, block_rank=4), SHAPES, MORE_TOL),
    # Appendix C / E variants (docs/more-variants.md): the reference path, never the fused one
    Entry(
        "more-alpha2", MoReConfig(target_modules=TARGET, nblocks=4, block_rank=2, alpha=2.0), SHAPES, MORE_TOL
    ),
    Entry(
        "more-scale",
        MoReConfig(target_modules=TARGET, nblocks=4, block_rank=2, learnable_scale=True),
        SHAPES,
        MORE_TOL,
    ),
    Entry(
        "more-scale-init-alpha",
        MoReConfig(
            target_modules=TARGET, nblocks=3, block_rank=2, learnable_scale=True, scale_init=0.5, alpha=3.0
        ),
        SHAPES,
        MORE_TOL,
    ),
    Entry(
        "more-mult",
        MoReConfig(target_modules=TARGET, nblocks=4, block_rank=2, composition="multiplicative"),
        SHAPES,
        MORE_TOL,
    ),
    Entry(
        "more-principal",
        MoReConfig(target_modules=TARGET, nblocks=4, block_rank=2, init_mode="principal"),
        SHAPES,
        MORE_TOL,
    ),
    Entry(
        "more-principal-scale",
        MoReConfig(
            target_modules=TARGET,
            nblocks=3,
            block_rank=1,
            init_mode="principal",
            learnable_scale=True,
            scale_init=0.5,
            alpha=2.0,
        ),
        SHAPES,
        MORE_TOL,
    ),
    Entry("mora-truncation", _mora(MoRAOperator.TRUNCATION, rank=2), SHAPES, MORA_TOL),
    Entry("mora-sharing-strided", _mora(MoRAOperator.SHARING, rank=2), SHAPES, MORA_TOL),
    Entry(
        "mora-sharing-adjacent", _mora(MoRAOperator.SHARING, SharingLayout.ADJACENT, rank=2), SHAPES, MORA_TOL
    ),
    Entry("mora-decouple", _mora(MoRAOperator.DECOUPLE, rank=2), SHAPES, MORA_TOL),
    Entry("mora-rotation", _mora(MoRAOperator.ROTATION, rank=2), SHAPES, MORA_TOL),
    Entry("mora-rotation-rhat6", _mora(MoRAOperator.ROTATION, rank=2, r_hat=6), SHAPES, MORA_TOL),
    Entry("lora-r4", LoRAConfig(target_modules=TARGET, rank=4, alpha=8.0), SHAPES, LORA_TOL),
)


@dataclass(frozen=True)
class Case:
    entry: Entry
    in_features: int
    out_features: int

    @property
    def config(self) -> AdapterConfig:
        return self.entry.config

    @property
    def method(self) -> Method:
        return self.entry.config.method

    @property
    def tol(self) -> Tolerance:
        return self.entry.tol

    @property
    def id(self) -> str:
        return f"{self.entry.variant}-in{self.in_features}-out{self.out_features}"


CASES: tuple[Case, ...] = tuple(Case(e, i, o) for e in TEST_CASES for i, o in e.shapes)


def cases(*methods: Method, operators: tuple[MoRAOperator, ...] | None = None) -> list:
    """``pytest.param`` per case (readable ids), optionally only some methods / MoRA operators."""
    chosen = [c for c in CASES if not methods or c.method in methods]
    if operators is not None:
        chosen = [c for c in chosen if c.method is Method.MORA and c.config.operator in operators]
    return [pytest.param(c, id=c.id) for c in chosen]


# -- independent oracles ------------------------------------------------------------------------
#: MoRA's r_hat per (variant, in, out), worked out by hand from the documented rule, not by running it:
#: explicit r_hat, else floor(sqrt((in + out) * rank)); TRUNCATION / SHARING capped at min(in, out)
#: (never reached here: every min is >= 20); ROTATION rounded down to even (at least 2). Every
#: variant has rank 2, so (in + out) * rank is 96, 112, 112, 120 on the four shapes:
#:   (24, 24): floor(sqrt(96)) = 9   (81 <= 96 < 100);  ROTATION: 9 is odd -> 8
#:   (20, 36): floor(sqrt(112)) = 10 (100 <= 112 < 121); ROTATION: 10
#:   (36, 20): 10, the same sum;                        (23, 37): floor(sqrt(120)) = 10 (100 <= 120 < 121)
#:   rotation-rhat6: the explicit 6 on every shape.
_R_HAT: dict[str, dict[tuple[int, int], int]] = {
    "mora-truncation": {(24, 24): 9, (20, 36): 10, (36, 20): 10, (23, 37): 10},
    "mora-sharing-strided": {(24, 24): 9, (20, 36): 10, (36, 20): 10, (23, 37): 10},
    "mora-sharing-adjacent": {(24, 24): 9, (20, 36): 10, (36, 20): 10, (23, 37): 10},
    "mora-decouple": {(24, 24): 9, (20, 36): 10, (36, 20): 10, (23, 37): 10},
    "mora-rotation": {(24, 24): 8, (20, 36): 10, (36, 20): 10, (23, 37): 10},
    "mora-rotation-rhat6": {(24, 24): 6, (20, 36): 6, (36, 20): 6, (23, 37): 6},
}


def expected_r_hat(case: Case) -> int:
    """MoRA's ``r_hat`` on a table case, from the hand-computed :data:`_R_HAT` (a new case needs a row)."""
    try:
        return _R_HAT[case.entry.variant][(case.in_features, case.out_features)]
    except KeyError:
        raise KeyError(f"no hand-computed r_hat for case {case.id}: add it to cases._R_HAT") from None


def expected_params(case: Case) -> int:
    c, i, o = case.config, case.in_features, case.out_features
    if c.method is Method.MORE:
        i = o if c.composition is Composition.MULTIPLICATIVE else i  # M is (out, out)
        scale = 1 if c.learnable_scale else 0
        return c.nblocks * c.block_rank * (math.ceil(i / c.nblocks) + math.ceil(o / c.nblocks)) + scale
    if c.method is Method.LORA:
        return c.rank * (i + o)
    return expected_r_hat(case) ** 2


def more_structural_rank(in_features: int, out_features: int, nblocks: int, block_rank: int) -> int:
    """Generic rank of MoRe's ΔW: blocks of the first factor that see fewer than ``block_rank``
    real (unpadded) inputs, or of the second that write fewer real outputs, lose rank."""
    in_blk, out_blk = math.ceil(in_features / nblocks), math.ceil(out_features / nblocks)
    real_in = [max(0, min(in_features, (k + 1) * in_blk) - k * in_blk) for k in range(nblocks)]
    real_out = [sum(1 for p in range(out_blk) if p * nblocks + b < out_features) for b in range(nblocks)]
    return min(sum(min(block_rank, n) for n in real_in), sum(min(block_rank, n) for n in real_out))


def expected_rank(case: Case) -> int:
    """Rank of ΔW for random (generic) adapter parameters, checked empirically on the table."""
    c, i, o = case.config, case.in_features, case.out_features
    if c.method is Method.MORE and c.composition is Composition.MULTIPLICATIVE:
        return min(more_structural_rank(o, o, c.nblocks, c.block_rank), i)  # rank(M·W), W generic
    if c.method is Method.MORE and c.init_mode is InitMode.PRINCIPAL:
        return more_structural_rank(i, o, c.nblocks, 2 * c.block_rank)  # M - M0: 2r per block and side
    if c.method is Method.MORE:
        return more_structural_rank(i, o, c.nblocks, c.block_rank)
    if c.method is Method.LORA:
        return min(c.rank, i, o)
    if c.operator in (MoRAOperator.TRUNCATION, MoRAOperator.SHARING):
        return expected_r_hat(case)
    return min(i, o)  # DECOUPLE / ROTATION: block-diagonal copies of (rotated) M cover every row
