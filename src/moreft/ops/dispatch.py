"""One fused layer op, two ways in: an autograd Function in eager mode, a custom op under ``torch.compile``.

The fused ops (:mod:`moreft.ops.fused`, :mod:`moreft.ops.blocks`, :mod:`moreft.ops.sharing`) update
strided views of their outputs in place (``baddbmm_`` into column blocks of ``y`` and ``∂x``) and
loop over Python-side layouts. Eager PyTorch runs that as written; inductor cannot (it fails to
re-view a strided ``baddbmm_`` target). So each op is written once, as a :class:`FusedImpl` with a
plain-tensor ``forward`` and ``backward``, and :func:`register` wraps it twice:

* eager: one ``torch.autograd.Function`` (no dispatcher overhead, the speed measured in
  ``docs/performance.md``);
* ``torch.compile``: a pair of ``torch.library`` custom ops, ``moreft::<name>`` and
  ``moreft::<name>_backward``, with fake (meta) implementations and autograd registered, so dynamo
  and inductor treat the layer as one opaque kernel and run the same eager code inside it. No
  graph break, ``fullgraph=True`` works, and outputs and gradients equal eager ones.

Every op has the same signature: tensors ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or
None, adapter tensors ``p1`` and ``p2`` (or None), and the op's constants as ``ints`` and
``floats`` (custom ops take only such types). ``forward`` returns ``y (T, out)`` and one tensor to
keep for the backward pass (empty if none); ``backward`` returns the gradients of ``x`` (as
``(T, in)``), ``weight``, ``bias``, ``p1``, ``p2``, None where not asked for.

The ops are registered in the ``moreft`` namespace of ``torch.library`` when their module is
imported (like any library that ships custom ops); nothing else changes in the process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Ints = Sequence[int]
Floats = Sequence[float]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]

#: Tensor dtypes an op casts to the autocast dtype when autocast is on (float64 is left alone, as autocast does).
AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)

_FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor p1, Tensor? p2, int[] ints, float[] floats)"
    " -> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor gy, Tensor x, Tensor weight, Tensor? bias, Tensor p1, Tensor? p2, Tensor saved, "
    "int[] ints, float[] floats, bool[] needs) -> Tensor[]"
)


@dataclass(frozen=True)
class FusedImpl:
    """One fused layer op (see the module docstring for the contract).

    ``forward(x2, weight, bias, p1, p2, ints, floats) -> (y2 (T, out), saved)``;
    ``backward(g2, x2, weight, bias, p1, p2, saved, ints, floats, needs) -> Grads`` with
    ``needs`` the five flags ``(x, weight, bias, p1, p2)``; ``saved_shape(tokens, weight, p1, p2,
    ints)`` is the shape of ``saved`` (for the fake implementation).
    """

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., Grads]
    saved_shape: Callable[[int, Tensor, Tensor, Tensor | None, Ints], tuple[int, ...]]
    ops: list = field(default_factory=list, compare=False)  # [forward op, backward op], set by register


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # (T, in)


def _run_forward(
    impl: FusedImpl,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p1: Tensor,
    p2: Tensor | None,
    ints: Ints,
    floats: Floats,
) -> tuple[Tensor, Tensor]:
    y2, saved = impl.forward(_flat(x), weight, bias, p1, p2, ints, floats)
    return y2.view(*x.shape[:-1], y2.shape[-1]), saved  # (..., out)


def _run_backward(
    impl: FusedImpl,
    gy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p1: Tensor,
    p2: Tensor | None,
    saved: Tensor,
    ints: Ints,
    floats: Floats,
    needs: Sequence[bool],
) -> Grads:
    dx, dw, dbias, dp1, dp2 = impl.backward(
        _flat(gy), _flat(x), weight, bias, p1, p2, saved, ints, floats, tuple(needs)
    )
    return (None if dx is None else dx.view(x.shape)), dw, dbias, dp1, dp2


class _Fused(torch.autograd.Function):
    """The eager path: ``impl``'s forward and backward as one autograd node."""

    @staticmethod
    def forward(
        ctx,
        impl: FusedImpl,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        p1: Tensor,
        p2: Tensor | None,
        ints: Ints,
        floats: Floats,
    ) -> Tensor:
        y, saved = _run_forward(impl, x, weight, bias, p1, p2, ints, floats)
        ctx.impl, ctx.ints, ctx.floats = impl, ints, floats
        ctx.save_for_backward(x, weight, bias, p1, p2, saved)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, weight, bias, p1, p2, saved = ctx.saved_tensors
        grads = _run_backward(
            ctx.impl, gy, x, weight, bias, p1, p2, saved, ctx.ints, ctx.floats, ctx.needs_input_grad[1:6]
        )
        return (None, *grads, None, None)


def base_grads(g2: Tensor, x2: Tensor, need_w: bool, need_bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """The frozen layer's own ``(∂W (out, in), ∂bias (out,))`` from ``g2 (T, out)`` and ``x2 (T, in)``.

    Every fused backward returns them (None where not needed: both are usually frozen).
    """
    dw = g2.T @ x2 if need_w else None  # (out, in)
    dbias = g2.sum(0) if need_bias else None  # (out,)
    return dw, dbias


def _grad_or_empty(gy: Tensor, grad: Tensor | None) -> Tensor:
    """A custom op returns no None: an empty tensor (``gy``'s dtype and device) stands for a gradient not asked for."""
    return gy.new_empty(0) if grad is None else grad.contiguous()


def register(impl: FusedImpl) -> FusedImpl:
    """Register ``impl``'s custom ops (``moreft::<name>``, ``moreft::<name>_backward``); returns ``impl``."""

    def forward_op(x, weight, bias, p1, p2, ints, floats):
        y, saved = _run_forward(impl, x, weight, bias, p1, p2, ints, floats)
        return y.contiguous(), saved.contiguous()

    def forward_fake(x, weight, bias, p1, p2, ints, floats):
        tokens = math.prod(x.shape[:-1])
        return (
            x.new_empty(*x.shape[:-1], weight.shape[0]),
            x.new_empty(impl.saved_shape(tokens, weight, p1, p2, ints)),
        )

    def backward_op(gy, x, weight, bias, p1, p2, saved, ints, floats, needs):
        grads = _run_backward(impl, gy, x, weight, bias, p1, p2, saved, ints, floats, needs)
        return [_grad_or_empty(gy, g if n else None) for n, g in zip(needs, grads, strict=True)]

    def backward_fake(gy, x, weight, bias, p1, p2, saved, ints, floats, needs):
        return [
            t.new_empty(t.shape) if n and t is not None else gy.new_empty(0)
            for t, n in zip((x, weight, bias, p1, p2), needs, strict=True)
        ]

    fwd = torch.library.custom_op(f"moreft::{impl.name}", forward_op, mutates_args=(), schema=_FORWARD_SCHEMA)
    bwd = torch.library.custom_op(
        f"moreft::{impl.name}_backward", backward_op, mutates_args=(), schema=_BACKWARD_SCHEMA
    )
    fwd.register_fake(forward_fake)
    bwd.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        x, weight, bias, p1, p2, ints, floats = inputs
        ctx.ints, ctx.floats = ints, floats
        ctx.save_for_backward(x, weight, bias, p1, p2, output[1])

    def backward(ctx, gy, _gsaved):
        x, weight, bias, p1, p2, saved = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:5]]
        grads = bwd(gy, x, weight, bias, p1, p2, saved, ctx.ints, ctx.floats, needs)
        return (*(g if n else None for g, n in zip(grads, needs, strict=True)), None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    impl.ops[:] = [fwd, bwd]
    return impl


def autocast_dtype(*tensors: Tensor | None) -> torch.dtype | None:
    """The dtype :func:`apply` casts ``tensors`` to and runs in: autocast's, when it is on for their
    device and every tensor is float32 / bfloat16 / float16 (float64 is left alone, as autocast does);
    else None (the op runs in the tensors' own dtype)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device.type
    if torch.is_autocast_enabled(device) and all(t.dtype in AUTOCAST_INPUTS for t in present):
        return torch.get_autocast_dtype(device)
    return None


def apply(
    impl: FusedImpl,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p1: Tensor,
    p2: Tensor | None,
    ints: Ints,
    floats: Floats = (),
) -> Tensor:
    """``y (..., out)`` of ``impl`` on ``x (..., in)``: custom op under ``torch.compile``, else eager.

    Without a graph to record (no grad mode, or nothing requires grad) the forward runs directly
    and keeps nothing. Under autocast every tensor is cast to the autocast dtype first (the casts
    are autograd ops, so fp32 parameters get fp32 gradients) and the op runs with autocast off, in
    that dtype: what autocast does to ``F.linear``, here for the base and the adapter at once.
    """
    device = x.device.type
    dtype = autocast_dtype(x, weight, bias, p1, p2)
    if dtype is not None:
        bias, p2 = (None if t is None else t.to(dtype) for t in (bias, p2))
        with torch.autocast(device, enabled=False):
            return apply(impl, x.to(dtype), weight.to(dtype), bias, p1.to(dtype), p2, ints, floats)
    if torch.compiler.is_compiling():
        return impl.ops[0](x, weight, bias, p1, p2, list(ints), list(floats))[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, p1, p2)):
        return _Fused.apply(impl, x, weight, bias, p1, p2, tuple(ints), tuple(floats))
    return _run_forward(impl, x, weight, bias, p1, p2, ints, floats)[0]
