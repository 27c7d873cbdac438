"""Triton kernels of the fused MoRe adapter path; launched by :mod:`moreft.ops.triton_more`.

The index algebra and the role of each kernel are described in :mod:`moreft.ops.triton_more`.
The ``@triton.jit`` decorators read ``TRITON_INTERPRET`` when this module is imported.
"""

from __future__ import annotations

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + a @ b`` with fp32 ``acc``.

        ``UPCAST`` (interpreter and bf16 only): Triton 3.7's interpreter multiplies bf16 tiles as
        their raw 16-bit integers, so they go through fp32 there (exact for bf16 products).
        """
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc, input_precision=PRECISION)
        return out

    @triton.jit
    def _more_down_kernel(
        x_ptr,
        w1_ptr,
        h_ptr,
        T,
        IN,
        IBLK,
        RANK,
        R,
        stride_xt,
        BT: tl.constexpr,
        BI: tl.constexpr,
        BR: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """h[t, k*r + j] = sum_i x[t, k*IBLK + i] * w1[k, j, i]; grid (T tiles, N)."""
        pid_t = tl.program_id(0)
        k = tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        j = tl.arange(0, BR)
        jmask = j < RANK
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        for i0 in range(0, IBLK, BI):
            i = i0 + tl.arange(0, BI)
            col = k * IBLK + i
            imask = (i < IBLK) & (col < IN)  # col >= IN is the zero padding
            xt = tl.load(
                x_ptr + rows64[:, None] * stride_xt + col[None, :],
                mask=rmask[:, None] & imask[None, :],
                other=0.0,
            )
            wt = tl.load(
                w1_ptr + k * RANK * IBLK + j[None, :] * IBLK + i[:, None],
                mask=imask[:, None] & jmask[None, :],
                other=0.0,
            )  # (BI, BR) = w1[k]ᵀ
            acc = _dot(xt, wt, acc, PRECISION, UPCAST)
        f = k * RANK + j
        tl.store(
            h_ptr + rows64[:, None] * R + f[None, :],
            acc.to(h_ptr.dtype.element_ty),
            mask=rmask[:, None] & jmask[None, :],
        )

    @triton.jit
    def _more_up_kernel(
        h_ptr,
        w2_ptr,
        y_ptr,
        T,
        OUT,
        NB,
        OBLK,
        RANK,
        R,
        stride_yt,
        BT: tl.constexpr,
        BO: tl.constexpr,
        BF: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """y[t, o] = sum_{f % N == o % N} h[t, f] * w2[o % N, o // N, f // N]; grid (T, out tiles)."""
        pid_t = tl.program_id(0)
        pid_o = tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        o = pid_o * BO + tl.arange(0, BO)
        omask = o < OUT
        c_o = o % NB
        p = o // NB
        acc = tl.zeros((BT, BO), dtype=tl.float32)
        for f0 in range(0, R, BF):
            f = f0 + tl.arange(0, BF)
            fmask = f < R
            ht = tl.load(
                h_ptr + rows64[:, None] * R + f[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0
            )  # (BT, BF)
            bmask = fmask[:, None] & omask[None, :] & ((f % NB)[:, None] == c_o[None, :])
            bt = tl.load(
                w2_ptr + c_o[None, :] * (OBLK * RANK) + p[None, :] * RANK + (f // NB)[:, None],
                mask=bmask,
                other=0.0,
            )  # (BF, BO) = folded Bᵀ tile
            acc = _dot(ht, bt, acc, PRECISION, UPCAST)
        tl.store(
            y_ptr + rows64[:, None] * stride_yt + o[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=rmask[:, None] & omask[None, :],
        )

    @triton.jit
    def _more_dh_kernel(
        dy_ptr,
        w2_ptr,
        part_ptr,
        T,
        OUT,
        NB,
        OBLK,
        RANK,
        R,
        stride_dyt,
        tiles_per_split,
        BT: tl.constexpr,
        BO: tl.constexpr,
        BF: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """part[s, t, f] = sum_{o in split s, o % N == f % N} dy[t, o] * w2[o % N, o // N, f // N].

        Grid (T tiles, R tiles, S): the reduction over ``out`` is split so that short sequences
        still fill the GPU; the fp32 partials ``(S, T, R)`` are summed afterwards.
        """
        pid_t = tl.program_id(0)
        pid_f = tl.program_id(1)
        s = tl.program_id(2)
        rows = pid_t * BT + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        f = pid_f * BF + tl.arange(0, BF)
        fmask = f < R
        c_f = f % NB
        a = f // NB
        acc = tl.zeros((BT, BF), dtype=tl.float32)
        for it in range(tiles_per_split):
            o = (s * tiles_per_split + it) * BO + tl.arange(0, BO)
            omask = o < OUT
            c_o = o % NB
            dyt = tl.load(
                dy_ptr + rows64[:, None] * stride_dyt + o[None, :],
                mask=rmask[:, None] & omask[None, :],
                other=0.0,
            )  # (BT, BO)
            bmask = omask[:, None] & fmask[None, :] & (c_o[:, None] == c_f[None, :])
            bt = tl.load(
                w2_ptr + c_o[:, None] * (OBLK * RANK) + (o // NB)[:, None] * RANK + a[None, :],
                mask=bmask,
                other=0.0,
            )  # (BO, BF) = folded B tile
            acc = _dot(dyt, bt, acc, PRECISION, UPCAST)
        tl.store(
            part_ptr + s.to(tl.int64) * T * R + rows64[:, None] * R + f[None, :],
            acc,
            mask=rmask[:, None] & fmask[None, :],
        )

    @triton.jit
    def _more_dw2_kernel(
        dy_ptr,
        h_ptr,
        part_ptr,
        T,
        OUT,
        NB,
        OBLK,
        RANK,
        R,
        stride_dyt,
        n_f_tiles,
        tiles_per_split,
        BT: tl.constexpr,
        BO: tl.constexpr,
        BF: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """part[s, c, p, a] = sum_{t in split s} dy[t, p*N + c] * h[t, a*N + c]; grid (out x R tiles, S)."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        pid_o = pid // n_f_tiles
        pid_f = pid % n_f_tiles
        o = pid_o * BO + tl.arange(0, BO)
        omask = o < OUT
        f = pid_f * BF + tl.arange(0, BF)
        fmask = f < R
        acc = tl.zeros((BO, BF), dtype=tl.float32)
        for it in range(tiles_per_split):
            rows = (s * tiles_per_split + it) * BT + tl.arange(0, BT)
            rmask = rows < T
            rows64 = rows.to(tl.int64)
            dyt = tl.load(
                dy_ptr + rows64[:, None] * stride_dyt + o[None, :],
                mask=rmask[:, None] & omask[None, :],
                other=0.0,
            )  # (BT, BO)
            ht = tl.load(
                h_ptr + rows64[:, None] * R + f[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0
            )  # (BT, BF)
            acc = _dot(tl.trans(dyt), ht, acc, PRECISION, UPCAST)
        c_o = o % NB
        keep = omask[:, None] & fmask[None, :] & (c_o[:, None] == (f % NB)[None, :])
        dst = (
            s.to(tl.int64) * (NB * OBLK * RANK)
            + c_o[:, None] * (OBLK * RANK)
            + (o // NB)[:, None] * RANK
            + (f // NB)[None, :]
        )
        tl.store(part_ptr + dst, acc, mask=keep)

    @triton.jit
    def _more_dx_dw1_kernel(
        dh_ptr,
        w1_ptr,
        x_ptr,
        dx_ptr,
        part_ptr,
        T,
        IN,
        IBLK,
        RANK,
        R,
        stride_xt,
        stride_dxt,
        n_i_tiles,
        tiles_per_split,
        BT: tl.constexpr,
        BI: tl.constexpr,
        BR: tl.constexpr,
        COMPUTE_DX: tl.constexpr,
        COMPUTE_DW1: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """dx[t, k*IBLK + i] = sum_j dh[t, k*r + j] w1[k, j, i]; part[s, k, j, i] = sum_t dh x."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        k = pid // n_i_tiles
        i = (pid % n_i_tiles) * BI + tl.arange(0, BI)
        col = k * IBLK + i
        imask = i < IBLK
        cmask = imask & (col < IN)  # columns of the real (unpadded) input
        j = tl.arange(0, BR)
        jmask = j < RANK
        f = k * RANK + j
        w1t = tl.load(
            w1_ptr + k * RANK * IBLK + j[:, None] * IBLK + i[None, :],
            mask=jmask[:, None] & imask[None, :],
            other=0.0,
        )  # (BR, BI)
        acc = tl.zeros((BR, BI), dtype=tl.float32)
        for it in range(tiles_per_split):
            rows = (s * tiles_per_split + it) * BT + tl.arange(0, BT)
            rmask = rows < T
            rows64 = rows.to(tl.int64)
            dht = tl.load(
                dh_ptr + rows64[:, None] * R + f[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0
            )  # (BT, BR)
            if COMPUTE_DX:
                dxt = _dot(dht, w1t, tl.zeros((BT, BI), dtype=tl.float32), PRECISION, UPCAST)
                tl.store(
                    dx_ptr + rows64[:, None] * stride_dxt + col[None, :],
                    dxt.to(dx_ptr.dtype.element_ty),
                    mask=rmask[:, None] & cmask[None, :],
                )
            if COMPUTE_DW1:
                xt = tl.load(
                    x_ptr + rows64[:, None] * stride_xt + col[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                )  # (BT, BI)
                acc = _dot(tl.trans(dht), xt, acc, PRECISION, UPCAST)
        if COMPUTE_DW1:
            dst = s.to(tl.int64) * (R * IBLK) + k * RANK * IBLK + j[:, None] * IBLK + i[None, :]
            tl.store(part_ptr + dst, acc, mask=jmask[:, None] & imask[None, :])
