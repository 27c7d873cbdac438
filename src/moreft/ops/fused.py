"""Fused training kernels: a frozen linear layer and its low-rank adapter as one autograd Function.

Unfused, ``base(x) + adapter(x)`` materialises the adapter's ``(T, out)`` output and the sum,
and autograd keeps token-sized temporaries (and, for MoRe's literal form, permutation copies) for
the backward pass. Here the layer is one :class:`torch.autograd.Function` over the parameters
themselves, so the only token-sized buffers are the output and the input gradient, which the
frozen layer needs anyway, and the parameter-sized folding happens inside (no autograd nodes).

``ΔW = B @ A`` with ``A (k, in)``, ``B (out, k)`` (``T`` tokens, leading dims flattened):

* LoRA: ``A = lora_A``, ``B = (alpha / r) · lora_B``, ``k = r`` (:func:`lora_linear`).
* MoRe: ``A = blkdiag(blkdiag1)`` (block ``n`` is rows ``n·r ...``), kept as its blocks so the
  ``A`` products run as one strided ``bmm`` (``1/N`` of the dense work); ``B`` is ``blkdiag2``
  with both permutations of the paper folded in, ``B[p·N + b, a·N + b] = blkdiag2[b, p, a]``,
  written by one strided copy (:func:`moreft.ops.monarch.fold_more_b`), ``k = N·r`` (:func:`more_linear`).

Forward: ``y = x Wᵀ + bias`` (the frozen layer's own GEMM), ``hᵀ = A xᵀ`` (``k × T``, kept for the
backward pass), then ``y += h Bᵀ`` in place. Backward, with ``g = ∂L/∂y``: ``gBᵀ = (g B)ᵀ``,
``∂x = g W`` then ``∂x += gB A`` in place, ``∂A = gBᵀ x``, ``∂Bᵀ = hᵀ g``; every weight gradient
is a ``small · big`` product, and MoRe's are cut back to its blocks by strided views. MoRA's
operators are handled alike in :mod:`moreft.ops.blocks` and :mod:`moreft.ops.sharing`.

Exactness: the same products as the reference in another association order: results agree to
rounding (fp64 to ~1e-13). The layers fall back to their literal reference path where fusing
could change results or semantics: active dropout, bf16/fp16 bases outside autocast (the adapter
stays fp32 there), ``torch.func`` transforms, base layers with hooks or of a subclass type
(``AdapterLayer._base_weight_bias`` decides). Under autocast the fused op runs in the autocast
dtype (every input cast to it, as autocast casts ``F.linear``'s), with the parameters' gradients
cast back to their own dtype by autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .monarch import fold_more_a, fold_more_b, more_a_grad, more_b_grad

_FUSED_DTYPES = (torch.float32, torch.float64)
_enabled = True


def fused_enabled() -> bool:
    """Whether adapter layers use the fused path by default (a layer's ``fused`` overrides it)."""
    return _enabled


def set_fused_enabled(enabled: bool) -> bool:
    """Switch the fused path on or off for every layer whose ``fused`` is None; returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Context in which adapter layers run their literal reference path (tests, comparisons)."""
    old = set_fused_enabled(False)
    try:
        yield
    finally:
        set_fused_enabled(old)


def _functorch_active() -> bool:
    """True inside ``torch.func`` transforms (vmap, grad, jvp), which these Functions do not support."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def fusable(x: Tensor, weight: Tensor, *others: Tensor) -> bool:
    """True when ``x``, the base weight and ``others`` (adapter tensors, bias) can go through one Function.

    All must be on one device, and no ``torch.func`` transform may be active. Without autocast they
    must share one float32/float64 dtype (a bf16 base with its fp32 adapter runs the reference
    path). Under autocast any mix of float32, bfloat16 and float16 is fine: the op runs in the
    autocast dtype, as ``F.linear`` would (:func:`moreft.ops.dispatch.apply`).
    """
    tensors = (x, weight, *others)
    if any(t.device != weight.device for t in tensors) or _functorch_active():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return all(t.dtype in dispatch.AUTOCAST_INPUTS for t in tensors)
    return weight.dtype in _FUSED_DTYPES and all(t.dtype == weight.dtype for t in tensors)


# -- the Function -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Factors:
    """How the Function reads its ``a`` and ``b`` inputs.

    ``lora``: ``a = lora_A (r, in)``, ``b = lora_B (out, r)``, ``B = scale · b``. ``more``:
    ``a = blkdiag1 (N, r, I)``, ``b = blkdiag2 (N, O, r)``; ``blocked`` when ``N·I == in`` (no
    padding), so the ``A`` products run per block on strided views.
    """

    more: bool
    scale: float
    blocked: bool


def _x_blocks(t: Tensor, nblocks: int) -> Tensor:
    """``(T, N·I)`` as ``(N, T, I)``, a strided view."""
    return t.view(t.shape[0], nblocks, t.shape[1] // nblocks).transpose(0, 1)


def _h_t(x2: Tensor, a: Tensor, a_dense: Tensor | None, spec: _Factors) -> Tensor:
    """``hᵀ = A xᵀ`` of shape ``(k, T)``."""
    if spec.blocked:
        h_t = torch.bmm(a, _x_blocks(x2, a.shape[0]).transpose(1, 2))  # (N, r, T)
        return h_t.view(a.shape[0] * a.shape[1], x2.shape[0])
    assert a_dense is not None  # dense whenever not blocked
    return torch.mm(a_dense, x2.T)  # (k, T)


def _gb_t(g2: Tensor, b: Tensor) -> Tensor:
    """``gBᵀ = Bᵀ gᵀ`` of shape ``(k, T)``; for ``k >= 16`` the transposed view of ``g B`` (faster in MKL)."""
    if b.shape[1] < 16:
        return b.T @ g2.T
    return (g2 @ b).T


def _forward(
    x2: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, spec: _Factors
) -> tuple[Tensor, tuple[Tensor, Tensor | None, Tensor]]:
    """``y (T, out)`` and what the backward pass needs: ``(B, dense A or None, hᵀ)``."""
    if spec.more:
        b_full = fold_more_b(b, weight.shape[0])  # (out, N·r)
        a_dense = None if spec.blocked else fold_more_a(a, x2.shape[1])  # (N·r, in)
    else:
        b_full, a_dense = b * spec.scale, a  # (out, r), (r, in)
    y = F.linear(x2, weight, bias)  # (T, out): the frozen layer
    h_t = _h_t(x2, a, a_dense, spec)  # (k, T)
    y.addmm_(h_t.T, b_full.T)
    return y, (b_full, a_dense, h_t)


def _spec(ints: Sequence[int], floats: Sequence[float]) -> _Factors:
    return _Factors(more=bool(ints[0]), scale=float(floats[0]), blocked=bool(ints[1]))


def _lowrank_forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    ints: Sequence[int],
    floats: Sequence[float],
) -> tuple[Tensor, Tensor]:
    y, (_, _, h_t) = _forward(x2, weight, bias, a, b, _spec(ints, floats))
    return y, h_t  # (T, out), (k, T)


def _lowrank_backward(
    g2: Tensor,
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    h_t: Tensor,
    ints: Sequence[int],
    floats: Sequence[float],
    needs: tuple[bool, ...],
) -> dispatch.Grads:
    """Gradients of ``(x2, weight, bias, a, b)``; nothing token-sized is allocated but ``∂x``."""
    spec = _spec(ints, floats)
    need_x, need_w, need_bias, need_a, need_b = needs
    if spec.more:  # the folds again: parameter-sized strided copies, cheaper than keeping them
        b_full = fold_more_b(b, weight.shape[0])  # (out, N·r)
        a_dense = None if spec.blocked else fold_more_a(a, x2.shape[1])  # (N·r, in)
    else:
        b_full, a_dense = b * spec.scale, a  # (out, r), (r, in)
    dx = da = db = None
    if need_x or need_a:
        gb_t = _gb_t(g2, b_full)  # (k, T)
        if need_x:
            dx = g2 @ weight  # (T, in): what the frozen layer computes anyway
            if spec.blocked:  # gB viewed (N, T, r)
                _x_blocks(dx, a.shape[0]).baddbmm_(
                    gb_t.view(a.shape[0], a.shape[1], x2.shape[0]).transpose(1, 2), a
                )
            else:
                assert a_dense is not None  # dense whenever not blocked
                dx.addmm_(gb_t.T, a_dense)
        if need_a:
            if spec.blocked:
                da = torch.bmm(
                    gb_t.view(a.shape[0], a.shape[1], x2.shape[0]), _x_blocks(x2, a.shape[0])
                )  # (N, r, I)
            elif spec.more:
                da_pad = x2.new_zeros(a.shape[0] * a.shape[1], a.shape[0] * a.shape[2])  # (N·r, N·I)
                da_pad[:, : x2.shape[1]].addmm_(gb_t, x2)
                da = more_a_grad(da_pad, a)
            else:
                da = gb_t @ x2  # (r, in)
        del gb_t  # freed before ∂B's buffer is made: one fewer (k, T) buffer at the peak
    if need_b:
        if spec.more:
            db_pad = x2.new_zeros(h_t.shape[0], b.shape[0] * b.shape[1])  # (N·r, N·O)
            db_pad[:, : g2.shape[1]].addmm_(h_t, g2)
            db = more_b_grad(db_pad, b)
        else:
            db = (h_t @ g2).T.mul_(spec.scale)  # (out, r)
    dw, dbias = dispatch.base_grads(g2, x2, need_w, need_bias)
    return dx, dw, dbias, da, db


def _saved_shape(
    tokens: int, weight: Tensor, a: Tensor, b: Tensor | None, ints: Sequence[int]
) -> tuple[int, ...]:
    k = a.shape[0] * a.shape[1] if ints[0] else a.shape[0]
    return (k, tokens)  # hᵀ


LOWRANK = dispatch.register(
    dispatch.FusedImpl("lowrank_linear", _lowrank_forward, _lowrank_backward, _saved_shape)
)


def _apply(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, spec: _Factors) -> Tensor:
    return dispatch.apply(LOWRANK, x, weight, bias, a, b, (int(spec.more), int(spec.blocked)), (spec.scale,))


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float
) -> Tensor:
    """``F.linear(x, weight, bias) + scale · x lora_aᵀ lora_bᵀ``, fused.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` (a transposed view is fine, e.g. for GPT-2 ``Conv1D``).
        bias: ``(out,)`` or None.
        lora_a: ``(r, in)``.
        lora_b: ``(out, r)``.
        scale: ``alpha / r``.

    Returns:
        ``(..., out)``; gradients reach every input that requires them.
    """
    return _apply(x, weight, bias, lora_a, lora_b, _Factors(more=False, scale=scale, blocked=False))


def more_linear(x: Tensor, weight: Tensor, bias: Tensor | None, blkdiag1: Tensor, blkdiag2: Tensor) -> Tensor:
    """``F.linear(x, weight, bias) + more_reference(x, blkdiag1, blkdiag2, out)``, fused.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` (a transposed view is fine).
        bias: ``(out,)`` or None.
        blkdiag1: ``(N, r, I)``, ``I = ceil(in / N)``.
        blkdiag2: ``(N, O, r)``, ``O = ceil(out / N)``.

    Returns:
        ``(..., out)``; gradients come back in the blocks' own shapes.
    """
    dtype = dispatch.autocast_dtype(x, weight, bias, blkdiag1, blkdiag2) or x.dtype  # what the op runs in
    # The blocked A products (strided bmm over the N blocks) beat one dense (N·r, in) GEMM in fp32 and
    # fp64; in bf16 / fp16 the dense GEMM with N times the work is faster on CPU (docs/performance.md).
    blocked = blkdiag1.shape[0] * blkdiag1.shape[2] == x.shape[-1] and dtype in _FUSED_DTYPES
    return _apply(x, weight, bias, blkdiag1, blkdiag2, _Factors(more=True, scale=1.0, blocked=blocked))
