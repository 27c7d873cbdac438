"""Launching the MoRe Triton kernels: tile sizes, reduction splits and the forward/backward launches.

:mod:`moreft.ops.triton_more` holds the public entry points and the autograd Function; this module
holds what they launch (``_forward``, ``_backward``), the launch heuristics, and whether the kernels
were built by Triton's interpreter (``TRITON_INTERPRET=1`` when it was imported).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # optional dependency
    import triton
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# Whether the kernels below were built by the interpreter (decided when this module is imported).
_INTERPRETED = triton is not None and _env_interpret()


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
