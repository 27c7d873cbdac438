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

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# Whether the kernels below were built by the interpreter (decided when this module is imported).
_INTERPRETED = triton is not None and _env_interpret()


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


if triton is not None:
    from moreft.ops.triton_kernels import (
        _more_dh_kernel,
        _more_down_kernel,
        _more_dw2_kernel,
        _more_dx_dw1_kernel,
        _more_up_kernel,
    )


# ----------------------------------------------------------------------------------------------
# Launch configuration: fixed heuristics, not yet tuned on hardware (see docs/triton.md).
# ----------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _on_gpu(x: Tensor) -> bool:
    return x.is_cuda and not _INTERPRETED


def _cfg(x: Tensor) -> dict:
    """Tile sizes. ``BT`` is the largest token tile; kernels shrink it (down to 16) on short T."""
    if _on_gpu(x):
        return {"BT": 64, "BI": 64, "BO": 64, "BF_MAX": 64, "num_warps": 4, "num_stages": 3}
    # Interpreter: the smallest legal tiles, so that small test shapes exercise every loop,
    # mask and split.
    return {"BT": 16, "BI": 16, "BO": 16, "BF_MAX": 16, "num_warps": 4, "num_stages": 1}


def _target_programs(x: Tensor) -> int:
    """About two programs per SM; 2 under the interpreter (forces the split code paths)."""
    if _on_gpu(x):
        return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 2


def _token_tile(t: int, other_programs: int, bt_max: int, target: int) -> int:
    """Largest power-of-two token tile in [16, bt_max] that still yields ``target`` programs."""
    bt = bt_max
    while bt > 16 and triton.cdiv(t, bt) * other_programs < target:
        bt //= 2
    return bt


def _splits(n_tiles: int, other_programs: int, target: int) -> tuple[int, int]:
    """Split a reduction over ``n_tiles`` tiles into ``S`` parts: returns (S, tiles per split)."""
    want = max(1, min(n_tiles, triton.cdiv(target, max(other_programs, 1))))
    per = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, per), per


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by Triton for fp16/bf16 operands


def _check(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, out_features: int) -> None:
    if blkdiag1.dim() != 3 or blkdiag2.dim() != 3:
        raise ValueError(
            f"blkdiag1 (N, r, I) and blkdiag2 (N, O, r) must be 3-D, got "
            f"{tuple(blkdiag1.shape)} and {tuple(blkdiag2.shape)}"
        )
    nb, rank, in_blk = blkdiag1.shape
    if blkdiag2.shape[0] != nb or blkdiag2.shape[2] != rank:
        raise ValueError(
            f"blkdiag2 {tuple(blkdiag2.shape)} does not match blkdiag1 "
            f"{tuple(blkdiag1.shape)}: expected ({nb}, O, {rank})"
        )
    if x.dim() < 1 or x.shape[-1] > nb * in_blk:
        raise ValueError(f"x of shape {tuple(x.shape)} has more features than N * I = {nb * in_blk}")
    if not 0 < out_features <= nb * blkdiag2.shape[1]:
        raise ValueError(f"out_features={out_features} must be in [1, N * O = {nb * blkdiag2.shape[1]}]")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"more_triton supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if not blkdiag1.is_floating_point() or not blkdiag2.is_floating_point():
        raise TypeError("blkdiag1 and blkdiag2 must be floating point")
    if not (x.device == blkdiag1.device == blkdiag2.device):
        raise ValueError("x, blkdiag1 and blkdiag2 must be on the same device")


def _forward(x2: Tensor, w1: Tensor, w2: Tensor, out_features: int) -> tuple[Tensor, Tensor]:
    """``x2 (T, in)`` contiguous, ``w1``/``w2`` contiguous in ``x2.dtype`` -> ``(y (T, out), h (T, N*r))``."""
    nb, rank, in_blk = w1.shape
    out_blk = w2.shape[1]
    t, n = x2.shape
    r_tot = nb * rank
    cfg, target = _cfg(x2), _target_programs(x2)
    kw = {
        "PRECISION": _precision(x2.dtype),
        "UPCAST": _INTERPRETED and x2.dtype == torch.bfloat16,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    h = torch.empty(t, r_tot, device=x2.device, dtype=x2.dtype)
    y = torch.empty(t, out_features, device=x2.device, dtype=x2.dtype)

    bt = _token_tile(t, nb, cfg["BT"], target)
    bi = min(cfg["BI"], _pow2(in_blk))
    _more_down_kernel[(triton.cdiv(t, bt), nb)](
        x2, w1, h, t, n, in_blk, rank, r_tot, x2.stride(0), BT=bt, BI=bi, BR=_pow2(rank), **kw
    )

    bo = min(cfg["BO"], _pow2(out_features))
    bf = min(cfg["BF_MAX"], _pow2(r_tot))
    bt = _token_tile(t, triton.cdiv(out_features, bo), cfg["BT"], target)
    _more_up_kernel[(triton.cdiv(t, bt), triton.cdiv(out_features, bo))](
        h, w2, y, t, out_features, nb, out_blk, rank, r_tot, y.stride(0), BT=bt, BO=bo, BF=bf, **kw
    )
    return y, h


def _backward(
    dy2: Tensor, x2: Tensor, w1: Tensor, w2: Tensor, h: Tensor, need_dx: bool, need_dw1: bool, need_dw2: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for ``x2 (T, in)``, ``w1 (N, r, I)`` and ``w2 (N, O, r)``; the dW are fp32."""
    nb, rank, in_blk = w1.shape
    out_blk = w2.shape[1]
    t, n = x2.shape
    out_features = dy2.shape[1]
    r_tot = nb * rank
    cfg, target = _cfg(x2), _target_programs(x2)
    kw = {
        "PRECISION": _precision(x2.dtype),
        "UPCAST": _INTERPRETED and x2.dtype == torch.bfloat16,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    bo = min(cfg["BO"], _pow2(out_features))
    bf = min(cfg["BF_MAX"], _pow2(r_tot))
    o_tiles, f_tiles = triton.cdiv(out_features, bo), triton.cdiv(r_tot, bf)
    dx: Tensor | None = None
    dw1: Tensor | None = None
    dw2: Tensor | None = None

    if need_dw2:  # d blkdiag2 = the f % N == o % N entries of dyᵀ @ h, T split into fp32 partials
        bt = cfg["BT"]
        t_tiles = triton.cdiv(t, bt)
        splits, per = _splits(t_tiles, o_tiles * f_tiles, target)
        part = torch.zeros(splits, nb, out_blk, rank, device=x2.device, dtype=torch.float32)
        _more_dw2_kernel[(o_tiles * f_tiles, splits)](
            dy2,
            h,
            part,
            t,
            out_features,
            nb,
            out_blk,
            rank,
            r_tot,
            dy2.stride(0),
            f_tiles,
            per,
            BT=bt,
            BO=bo,
            BF=bf,
            **kw,
        )
        dw2 = part.sum(0)

    if need_dx or need_dw1:
        # dh = dy @ B, the out reduction split into fp32 partials when T alone cannot fill the GPU
        bt = _token_tile(t, f_tiles, cfg["BT"], target)
        t_tiles = triton.cdiv(t, bt)
        splits, per = _splits(o_tiles, t_tiles * f_tiles, target)
        part = torch.empty(splits, t, r_tot, device=x2.device, dtype=torch.float32)
        _more_dh_kernel[(t_tiles, f_tiles, splits)](
            dy2,
            w2,
            part,
            t,
            out_features,
            nb,
            out_blk,
            rank,
            r_tot,
            dy2.stride(0),
            per,
            BT=bt,
            BO=bo,
            BF=bf,
            **kw,
        )
        dh = part.sum(0).to(x2.dtype) if splits > 1 else part[0].to(x2.dtype)

        # one pass per (block, input tile, T split): dx tile and d blkdiag1 partial together
        bi = min(cfg["BI"], _pow2(in_blk))
        i_tiles = triton.cdiv(in_blk, bi)
        bt = cfg["BT"]
        t_tiles = triton.cdiv(t, bt)
        splits, per = _splits(t_tiles, nb * i_tiles, target) if need_dw1 else (t_tiles, 1)
        dx = torch.empty(t, n, device=x2.device, dtype=x2.dtype) if need_dx else None
        part_w1 = (
            torch.empty(splits, nb, rank, in_blk, device=x2.device, dtype=torch.float32) if need_dw1 else None
        )
        _more_dx_dw1_kernel[(nb * i_tiles, splits)](
            dh,
            w1,
            x2,
            dx if dx is not None else dh,
            part_w1 if part_w1 is not None else dh,
            t,
            n,
            in_blk,
            rank,
            r_tot,
            x2.stride(0),
            dx.stride(0) if dx is not None else 0,
            i_tiles,
            per,
            BT=bt,
            BI=bi,
            BR=_pow2(rank),
            COMPUTE_DX=need_dx,
            COMPUTE_DW1=need_dw1,
            **kw,
        )
        if part_w1 is not None:
            dw1 = part_w1.sum(0)
    return dx, dw1, dw2


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
