"""Fused Triton forward and backward for the MoRe adapter path (``x · ΔWᵀ``).

Same contract as :func:`moreft.ops.monarch.more_reference`: ``blkdiag1 (N, r, I)`` acts first on
the zero-padded input cut into ``N`` contiguous chunks of ``I``; the stride permutation
``reshape(T, r, N).transpose`` sits between the factors; ``blkdiag2 (N, O, r)`` produces output
position ``p * N + b`` from block ``b``; the result is truncated to ``out``.

Index algebra used by every kernel (``R = N * r``, ``h`` = the ``(T, R)`` intermediate in the
pseudocode's *pre-permutation* order, column ``f = k * r + j`` = rank ``j`` of block ``k``)::

    h[t, k*r + j]  = sum_i x[t, k*I + i] * blkdiag1[k, j, i]          (padded columns are zero)
    y[t, p*N + c]  = sum_a h[t, a*N + c] * blkdiag2[c, p, a]           (the stride permutation)

so output column ``o`` reads the ``r`` columns ``f`` of ``h`` with ``f % N == o % N``, weight
``blkdiag2[o % N, o // N, f // N]``. Neither permutation is ever materialised: the kernels compute
those indices on tiles and gather the (tiny, cache-resident) factors with masks.

Kernels (in :mod:`moreft.ops.triton_kernels`; ``BT`` token rows per tile; every ``tl.dot`` has
all dims >= 16, ranks are zero-padded):

* forward ``_down``: grid (T tiles, N blocks); ``h`` tile = ``x[:, chunk k] @ blkdiag1[k]ᵀ``,
  K-loop over the chunk; reads ``x`` exactly once.
* forward ``_up``: grid (T tiles, out tiles); ``y`` tile = ``h`` tile ``@ Bᵀ`` tile, where the
  ``(R, out)`` tile of the folded ``B`` is gathered from ``blkdiag2`` with the mask
  ``f % N == o % N``; writes ``y`` exactly once. ``h`` (``T * N * r`` elements, in the compute
  dtype) is the only intermediate and is saved for backward, so nothing is recomputed.
* backward ``_dh``: ``dh = dy @ B`` (same gathered ``B`` tiles), grid (T tiles, R tiles, S); on
  short T the ``out`` reduction is split over ``S`` programs writing fp32 partials ``(S, T, R)``.
* backward ``_dw2``: ``dB = dyᵀ @ h`` on (out tile, R tile) pairs, keeping only the ``f % N ==
  o % N`` entries, which are exactly ``d blkdiag2``; the T reduction is split over ``S`` programs
  writing fp32 partials (deterministic, no atomics), summed afterwards.
* backward ``_dx_dw1``: one pass per (block, input tile, T split): ``dx`` tile = ``dh_k @
  blkdiag1[k]`` and ``d blkdiag1[k]`` += ``dh_kᵀ @ x`` tile, so ``x`` is read once and ``dx``
  written once; fp32 partials over the T splits as above.

All accumulation is fp32. ``h`` and ``dh`` are rounded to the compute dtype exactly where the
PyTorch reference rounds its bmm outputs, so bf16/fp16 results track :func:`more_reference`.
fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

Triton is optional: this module imports without it, :func:`triton_available` then says ``False``
and :func:`more_triton` raises ``RuntimeError``. To run on CPU tensors in Triton's interpreter,
``TRITON_INTERPRET=1`` must be set before this module is imported (its ``@triton.jit`` decorators
read it); see ``tests/test_triton.py``, which does so in a child process.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ..errors import ConfigError
from .triton_launch import _INTERPRETED, SUPPORTED_DTYPES, _backward, _check, _env_interpret, _forward

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = [
    "SUPPORTED_DTYPES",
    "TRITON_MODES",
    "check_triton_env",
    "more_triton",
    "set_triton_mode",
    "triton_available",
    "triton_mode",
    "use_triton",
]


def triton_available(x: Tensor) -> bool:
    """Whether :func:`more_triton` can run on ``x``.

    ``True`` only when Triton imports and ``x`` (fp16/bf16/fp32) is on a CUDA device, or when this
    module was imported with ``TRITON_INTERPRET=1`` (tests: CPU tensors through the interpreter).
    """
    if triton is None or x.dtype not in SUPPORTED_DTYPES:
        return False
    if x.is_cuda:
        return True
    return _INTERPRETED and _env_interpret() and x.device.type == "cpu"


#: ``auto``: MoRe layers use the kernels on CUDA tensors; ``off``: never; ``on``: wherever
#: :func:`triton_available` says they can run (also CPU under ``TRITON_INTERPRET=1``, for tests).
TRITON_MODES = ("auto", "off", "on")
_MODE_ENV = "MOREFT_TRITON"


def _mode_from_env() -> str:
    """The mode ``$MOREFT_TRITON`` asks for (``auto`` when unset).

    Raises:
        ConfigError: (a ``ValueError``) the variable holds something else.
    """
    value = os.environ.get(_MODE_ENV, "auto").strip().lower()
    aliases = {"0": "off", "false": "off", "no": "off", "1": "on", "true": "on", "yes": "on"}
    value = aliases.get(value, value)
    if value not in TRITON_MODES:
        raise ConfigError(f"{_MODE_ENV}={value[:40]!r} must be one of {TRITON_MODES} (or 0/1)")
    return value


# A bad $MOREFT_TRITON must not break importing moreft (or `moreft --version`): it is reported where
# the mode is used, by check_triton_env / triton_mode / a MoRe forward (None: not known yet).
try:
    _mode: str | None = _mode_from_env()
except ConfigError:
    _mode = None


def check_triton_env() -> None:
    """Raise the error of a bad ``$MOREFT_TRITON`` (unless :func:`set_triton_mode` replaced it since).

    Raises:
        ConfigError: the variable holds something other than a mode.
    """
    triton_mode()


def triton_mode() -> str:
    """The current dispatch mode (one of :data:`TRITON_MODES`; initial value from ``$MOREFT_TRITON``).

    Raises:
        ConfigError: ``$MOREFT_TRITON`` held something other than a mode and no mode was set since.
    """
    return _mode if _mode is not None else _mode_from_env()


def set_triton_mode(mode: str) -> str:
    """Set the dispatch mode of MoRe layers and return the previous one.

    Raises:
        ConfigError: (a ``ValueError``) ``mode`` is not one of :data:`TRITON_MODES`.
    """
    global _mode
    if mode not in TRITON_MODES:
        raise ConfigError(f"triton mode {mode!r} must be one of {TRITON_MODES}")
    previous, _mode = _mode, mode
    return previous if previous is not None else "auto"


def use_triton(x: Tensor) -> bool:
    """Whether a MoRe layer should run its adapter branch on ``x`` through :func:`more_triton`.

    Raises:
        ConfigError: see :func:`triton_mode`.
    """
    mode = triton_mode()
    if mode == "off" or (mode == "auto" and not x.is_cuda):
        return False
    return triton_available(x)


if triton is not None:  # re-exported: the kernels as tests compile them (``triton_more._more_up_kernel``)
    from moreft.ops.triton_kernels import _more_dh_kernel as _more_dh_kernel
    from moreft.ops.triton_kernels import _more_down_kernel as _more_down_kernel
    from moreft.ops.triton_kernels import _more_dw2_kernel as _more_dw2_kernel
    from moreft.ops.triton_kernels import _more_dx_dw1_kernel as _more_dx_dw1_kernel
    from moreft.ops.triton_kernels import _more_up_kernel as _more_up_kernel


def _device_guard(x: Tensor):
    """Triton launches on the current CUDA device: make it x's (tensors on cuda:1, say)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _MoReTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, out_features: int) -> Tensor:
        batch_shape, n = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        w1 = blkdiag1.detach().to(x.dtype).contiguous()
        w2 = blkdiag2.detach().to(x.dtype).contiguous()
        if x2.shape[0] == 0:
            y, h = x2.new_zeros(0, out_features), x2.new_zeros(0, w1.shape[0] * w1.shape[1])
        else:
            with _device_guard(x2):
                y, h = _forward(x2, w1, w2, out_features)
        ctx.save_for_backward(x2, w1, w2, h)
        ctx.meta = (batch_shape, blkdiag1.dtype, blkdiag2.dtype)
        return y.reshape(*batch_shape, out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x2, w1, w2, h = ctx.saved_tensors
        batch_shape, dt1, dt2 = ctx.meta
        need_dx, need_dw1, need_dw2 = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype).contiguous()
        if x2.shape[0] == 0:
            dx = x2.new_zeros(x2.shape) if need_dx else None
            dw1 = torch.zeros(w1.shape, device=w1.device, dtype=dt1) if need_dw1 else None
            dw2 = torch.zeros(w2.shape, device=w2.device, dtype=dt2) if need_dw2 else None
        else:
            with _device_guard(x2):
                dx, dw1, dw2 = _backward(dy2, x2, w1, w2, h, need_dx, need_dw1, need_dw2)
        if dx is not None:
            dx = dx.reshape(*batch_shape, x2.shape[1])
        if dw1 is not None:
            dw1 = dw1.to(dt1)
        if dw2 is not None:
            dw2 = dw2.to(dt2)
        return dx, dw1, dw2, None


def more_triton(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, out_features: int) -> Tensor:
    """MoRe adapter output ``x · ΔWᵀ`` with fused Triton kernels (forward and backward).

    Same contract and result as :func:`moreft.ops.monarch.more_reference`.

    Args:
        x: input ``(..., in)``, fp16/bf16/fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        blkdiag1: ``(N, r, I)`` first factor, ``N * I >= in``.
        blkdiag2: ``(N, O, r)`` second factor, ``N * O >= out_features``.
        out_features: ``out``.

    The factors may have another floating dtype than ``x`` (e.g. fp32 master weights with bf16
    activations): they are cast to ``x.dtype`` for the products, and their gradients, accumulated
    in fp32, are returned in the factors' own dtype.

    Returns:
        Tensor of shape ``(..., out_features)`` in ``x.dtype``.

    Raises:
        RuntimeError: Triton is not installed, or ``x`` cannot run on it (see
            :func:`triton_available`).
        ValueError, TypeError: inconsistent shapes, devices or an unsupported dtype.
    """
    if triton is None:
        raise RuntimeError("more_triton needs the optional dependency 'triton' (pip install triton)")
    _check(x, blkdiag1, blkdiag2, out_features)
    if not triton_available(x):
        raise RuntimeError(
            f"more_triton cannot run on a {x.device.type} tensor: it needs CUDA, or "
            "TRITON_INTERPRET=1 set before triton and moreft.ops.triton_more are imported"
        )
    return _MoReTriton.apply(x, blkdiag1, blkdiag2, out_features)
