"""Experiment: can the fused MoRe/LoRA layer step get closer to the frozen layer at 1024², T=4096?

The fused path (``moreft.ops.fused``) costs about six token-sized memory passes beyond the
frozen layer's two GEMMs (x read for ``A xᵀ`` and for ``∂A``, ``y`` and ``∂x`` updated in place,
``g`` read for ``g B`` and for ``∂B``). This script times two ways to save some of them, each as
explicit forward + backward (no autograd), against the library's own ``_lowrank_forward`` /
``_lowrank_backward`` and the frozen layer, interleaved, paired per round:

* ``stacked``: one GEMM over ``[W; A]`` so ``x`` is read once for ``y`` and ``h``; ``y`` and ``h``
  are strided views of its ``(T, out + k)`` output (the issue's suggestion). Costs a per-step copy
  of ``W`` into the stacked buffer (``out · in`` floats of extra peak memory).
* ``chunked``: ``y = x (W + BA)ᵀ`` and ``∂x = g (W + BA)`` with ``W + BA`` formed one slab at a time
  (``chunk`` rows, then ``chunk`` columns) written into column slices of ``y`` / ``∂x``: no in-place
  update passes, extra peak memory one slab.

    python bench/stacked_gemm.py --rounds 15 --method more        # or --method lora

Prints per variant the median of per-round time ratios over the frozen layer and over ``fused``,
and each variant's largest deviation from ``fused`` (fp32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from moreft.ops.fused import _lowrank_backward, _lowrank_forward
from moreft.ops.monarch import fold_more_a, fold_more_b

NEEDS = (True, False, False, True, True)  # ∂x, ∂W, ∂bias, ∂a, ∂b


def _dense_ab(a: Tensor, b: Tensor, more: bool, out: int, inp: int, scale: float) -> tuple[Tensor, Tensor]:
    if more:
        return fold_more_a(a, inp), fold_more_b(b, out)  # (k, in), (out, k)
    return a, b * scale


def fused(x, w, a, b, g, more, scale):
    ints = (int(more), int(more))
    y, h_t = _lowrank_forward(x, w, None, a, b, ints, (scale,))
    dx, _, _, da, db = _lowrank_backward(g, x, w, None, a, b, h_t, ints, (scale,), NEEDS)
    return y, dx, da, db


def dense(x, w, a, b, g, more, scale):
    """The fused path with MoRe's first factor as one dense ``(N·r, in)`` matrix instead of blocks."""
    ints = (int(more), 0)
    y, h_t = _lowrank_forward(x, w, None, a, b, ints, (scale,))
    dx, _, _, da, db = _lowrank_backward(g, x, w, None, a, b, h_t, ints, (scale,), NEEDS)
    return y, dx, da, db


def stacked(x, w, a, b, g, more, scale):
    out, inp = w.shape
    a_d, b_d = _dense_ab(a, b, more, out, inp, scale)
    wa = torch.cat([w, a_d])  # (out + k, in)
    yh = x @ wa.T  # (T, out + k)
    del wa
    y, h = yh[:, :out], yh[:, out:]  # (T, out), (T, k): strided views
    y.addmm_(h, b_d.T)
    h_t = h.T  # (k, T)
    ints = (int(more), int(more))
    dx, _, _, da, db = _lowrank_backward(g, x, w, None, a, b, h_t, ints, (scale,), NEEDS)
    return y, dx, da, db


def _h_t(x: Tensor, a: Tensor, a_d: Tensor, more: bool) -> Tensor:
    if more:  # blocks: (N, r, I) @ (N, I, T)
        return torch.bmm(a, x.view(x.shape[0], a.shape[0], -1).permute(1, 2, 0)).flatten(0, 1)  # (N·r, T)
    return a_d @ x.T  # (k, T)


def chunked(x, w, a, b, g, more, scale, chunk=256):
    out, inp = w.shape
    a_d, b_d = _dense_ab(a, b, more, out, inp, scale)
    y = x.new_empty(x.shape[0], out)  # (T, out)
    for s in range(0, out, chunk):
        slab = torch.addmm(w[s : s + chunk], b_d[s : s + chunk], a_d)  # (c, in)
        torch.mm(x, slab.T, out=y[:, s : s + chunk])
    h_t = _h_t(x, a, a_d, more)  # (k, T)
    # backward: ∂x from the same slabs, column by column; ∂A, ∂B as the fused path computes them
    dx = g.new_empty(g.shape[0], inp)  # (T, in)
    for s in range(0, inp, chunk):
        slab = torch.addmm(w[:, s : s + chunk], b_d, a_d[:, s : s + chunk])  # (out, c)
        torch.mm(g, slab, out=dx[:, s : s + chunk])
    ints = (int(more), int(more))
    _, _, _, da, db = _lowrank_backward(
        g, x, w, None, a, b, h_t, ints, (scale,), (False, False, False, True, True)
    )
    return y, dx, da, db


def frozen(x, w, a, b, g, more, scale):
    y = F.linear(x, w)
    dx = g @ w
    return y, dx, None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("more", "lora"), default="more")
    p.add_argument("--shape", default="1024x1024x4096", help="in x out x T")
    p.add_argument("--rank", type=int, default=8, help="LoRA r or MoRe r_blk (N = 4)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    inp, out, tokens = (int(v) for v in args.shape.split("x"))
    more = args.method == "more"
    torch.manual_seed(0)
    x, g = torch.randn(tokens, inp), torch.randn(tokens, out)
    w = torch.randn(out, inp) / inp**0.5
    if more:
        a, b = torch.randn(4, args.rank, inp // 4) * 0.02, torch.randn(4, out // 4, args.rank) * 0.02
    else:
        a, b = torch.randn(args.rank, inp) * 0.02, torch.randn(out, args.rank) * 0.02
    scale = 2.0
    variants = {"frozen": frozen, "fused": fused, "stacked": stacked, "chunked": chunked}
    if more:
        variants["dense"] = dense
    ref = fused(x, w, a, b, g, more, scale)
    for name in [v for v in variants if v not in ("frozen", "fused")]:
        got = variants[name](x, w, a, b, g, more, scale)
        dev = max((got[i] - ref[i]).abs().max().item() for i in range(4))
        print(f"{name}: largest deviation from fused over y, ∂x, ∂a, ∂b = {dev:.2e}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds + 2):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(x, w, a, b, g, more, scale)
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    print(f"{args.method} r={args.rank}, {args.shape}, {args.rounds} rounds, {args.threads} threads")
    for name, ts in times.items():
        x_frozen = statistics.median(t / f for t, f in zip(ts, times["frozen"], strict=True))
        x_fused = statistics.median(t / f for t, f in zip(ts, times["fused"], strict=True))
        print(
            f"  {name:8s} median {statistics.median(ts) * 1e3:7.1f} ms  x frozen {x_frozen:.3f}  x fused {x_fused:.3f}"
        )


if __name__ == "__main__":
    main()
