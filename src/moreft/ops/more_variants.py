"""MoRe's Appendix C / E variants as sums of low-rank terms ``ΔW = Σ_t sign_t · B_t @ A_t``.

Every variant of :class:`moreft.MoReConfig` is exactly such a sum, with ``(A, B)`` the folded
factors of a Monarch product (:func:`moreft.ops.monarch.fold_factors`) and ``c`` the output scale
(``alpha``, times the learnable scalar ``s``):

* additive: ``ΔW = c·M`` -> one term ``(c·B, A)``;
* additive, principal init: ``ΔW = c·M(L, R) - c0·M(L0, R0)`` with ``(L0, R0)`` the frozen starting
  factors and ``c0`` the starting scale -> two terms, the second with sign -1;
* multiplicative: ``W' = (I + c·M)·W`` with ``M (out, out)``, so ``ΔW = c·M·W`` -> one term
  ``(c·B, A @ W)`` of rank ``N*r``.

The terms are evaluated one by one and then summed (never concatenated into one GEMM): two equal
terms of opposite sign then cancel exactly, so a principal-init adapter leaves the model
bit-identical at step 0. :func:`variant_reference` (and :func:`variant_delta_reference`) is the slow
literal definition the fast forms are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .monarch import fold_factors, more_reference


@dataclass(frozen=True)
class Term:
    """``sign · B @ A`` with ``B (out, k)`` and ``A (k, in)``."""

    b: Tensor
    a: Tensor
    sign: float = 1.0


def scaled(b: Tensor, coeff: Tensor | float) -> Tensor:
    """``B · c`` (``c`` a float or a ``(1,)`` tensor); ``B`` itself when ``c`` is the float 1."""
    return b if isinstance(coeff, float) and coeff == 1.0 else b * coeff


def additive_term(
    blkdiag1: Tensor,
    blkdiag2: Tensor,
    in_features: int,
    out_features: int,
    coeff: Tensor | float,
    sign: float = 1.0,
) -> Term:
    """``sign · c · P1·blkdiag2·P2·blkdiag1`` as a term of rank ``N*r``."""
    a, b = fold_factors(blkdiag1, blkdiag2, in_features, out_features)  # (N*r, in), (out, N*r)
    return Term(scaled(b, coeff), a, sign)


def multiplicative_term(blkdiag1: Tensor, blkdiag2: Tensor, weight: Tensor, coeff: Tensor | float) -> Term:
    """``c · M @ W`` for the square ``M (out, out)`` of the factors and the base ``weight (out, in)``.

    ``A @ W (N*r, in)`` costs one ``N*r``-row GEMM per call, independent of the number of tokens.
    """
    out_features = weight.shape[0]
    a, b = fold_factors(blkdiag1, blkdiag2, out_features, out_features)  # (N*r, out), (out, N*r)
    return Term(scaled(b, coeff), a @ weight)  # (N*r, out) @ (out, in) -> (N*r, in)


def _sum(parts: list[Tensor]) -> Tensor:
    """``parts[0] + parts[1] + ...`` left to right (``a + (-a)`` is exactly 0)."""
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def terms_delta(terms: list[Term]) -> Tensor:
    """Dense ``ΔW (out, in) = Σ sign · B @ A``, each product formed before the sum."""
    prods = [t.b @ t.a if t.sign > 0 else -(t.b @ t.a) for t in terms]  # (out, k) @ (k, in)
    return _sum(prods)


def terms_forward(x: Tensor, terms: list[Term]) -> Tensor:
    """``x · ΔWᵀ (..., out)`` for ``x (..., in)``: two GEMMs per term, no dense ``ΔW``."""
    ys = [F.linear(F.linear(x, t.a), t.b) for t in terms]  # (..., k) then (..., out)
    return _sum([y if t.sign > 0 else -y for y, t in zip(ys, terms, strict=True)])


def terms_lora(terms: list[Term]) -> tuple[Tensor, Tensor]:
    """One LoRA pair ``(A (K, in), B (out, K))`` with ``B @ A = ΔW``; ``K`` = the terms' ranks summed."""
    a = torch.cat([t.a for t in terms], dim=0)  # (K, in)
    b = torch.cat([t.b if t.sign > 0 else -t.b for t in terms], dim=1)  # (out, K)
    return a, b


def variant_reference(
    x: Tensor,
    blkdiag1: Tensor,
    blkdiag2: Tensor,
    out_features: int,
    coeff: Tensor | float,
    *,
    weight: Tensor | None = None,
    init: tuple[Tensor, Tensor, Tensor | float] | None = None,
) -> Tensor:
    """Slow ``x · ΔWᵀ`` of a variant, literally from the Appendix G pseudocode (:func:`more_reference`).

    Args:
        x: ``(..., in)``.
        blkdiag1, blkdiag2: the trained factors.
        out_features: ``out``.
        coeff: ``c`` (a number or a ``(1,)`` tensor).
        weight: the base weight ``(out, in)`` for the multiplicative composition: the output is
            ``c · M(W x)``, i.e. ``(I + c·M)·W x - W x``; None for additive.
        init: ``(L0, R0, c0)`` for the principal init: ``c · M x - c0 · M0 x``.
    """
    if weight is not None:
        return coeff * more_reference(
            F.linear(x, weight), blkdiag1, blkdiag2, out_features
        )  # M applied to W x
    y = coeff * more_reference(x, blkdiag1, blkdiag2, out_features)
    if init is not None:
        init1, init2, coeff0 = init
        y = y - coeff0 * more_reference(x, init1, init2, out_features)
    return y


def variant_delta_reference(
    blkdiag1: Tensor,
    blkdiag2: Tensor,
    in_features: int,
    out_features: int,
    coeff: Tensor | float,
    *,
    weight: Tensor | None = None,
    init: tuple[Tensor, Tensor, Tensor | float] | None = None,
) -> Tensor:
    """Slow dense ``ΔW (out, in)``: :func:`variant_reference` on the identity, transposed."""
    eye = torch.eye(in_features, dtype=blkdiag1.dtype, device=blkdiag1.device)
    return variant_reference(eye, blkdiag1, blkdiag2, out_features, coeff, weight=weight, init=init).T
