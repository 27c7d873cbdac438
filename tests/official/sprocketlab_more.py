"""Transcription of MoRe's official computations (SprocketLab/sparse_matrix_fine_tuning).

Sources, read and restated in our own words:

* ``src/layers/monarch_linear.py`` (@89094ed), ``MonarchLinear.__init__``: the block shapes
  (``blk_sz = int(math.ceil(in_features / nblocks))``; "Throw away blocks that are fully padded":
  ``nblocks = (in_features + in_blksz - 1) // in_blksz``; ``align_factor = out_features / in_features``;
  ``out_blksz = math.ceil(in_blksz * align_factor)``), ``preprocess`` (zero pad to
  ``nblocks * in_blksz``) and ``monarch_forward`` (multiply, then ``postprocess``: keep the first
  ``out_features``; no scaler, no dropout in the adapter setup tested here).
* ``src/models/layers/monarch_linear.py`` (@8b2dbc5): the earlier
  ``out_blksz = in_blksz * int(math.ceil(out_features / in_features))``.
* ``src/ops/blockdiag_butterfly_multiply.py`` (@0326bbc), ``BlockdiagButterflyMultiply.forward``:
  bmm with ``w1_bfly``, the "feature shuffling" reshape ``(seq, blk2_in, nblocks2)`` then
  ``permute(2, 0, 1)``, bmm with ``w2_bfly``, ``permute(1, 2, 0)`` and flatten. Their backward is
  written by hand; here autograd differentiates the transcribed forward (the same function).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def block_shapes(in_f: int, out_f: int, nblocks: int, float_align: bool = True) -> tuple[int, int, int]:
    """``(nblocks, in_blksz, out_blksz)`` as ``MonarchLinear.__init__`` leaves them."""
    in_blksz = int(math.ceil(in_f / nblocks))  # noqa: RUF046 - their expression
    if nblocks * in_blksz > in_f or nblocks * in_blksz < in_f:
        nblocks = (in_f + in_blksz - 1) // in_blksz
    if float_align:
        out_blksz = math.ceil(in_blksz * (out_f / in_f))
    else:
        out_blksz = in_blksz * int(math.ceil(out_f / in_f))  # noqa: RUF046 - their expression
    return nblocks, in_blksz, out_blksz


def butterfly_multiply(x: Tensor, w1_bfly: Tensor, w2_bfly: Tensor) -> Tensor:
    """``BlockdiagButterflyMultiply.forward`` for ``x (..., n)``, ``w1 (k, q, p)``, ``w2 (l, s, r)``."""
    batch_shape, n = x.shape[:-1], x.shape[-1]
    seq_dim = math.prod(batch_shape)
    nblocks1, blk1_out, blk1_in = w1_bfly.shape
    nblocks2, blk2_out, blk2_in = w2_bfly.shape
    assert nblocks1 * blk1_in == n and nblocks2 * blk2_in == nblocks1 * blk1_out
    x_reshaped = x.reshape(seq_dim, nblocks1, blk1_in).transpose(0, 1)
    out1 = torch.bmm(x_reshaped, w1_bfly.transpose(-1, -2))  # (nblocks1, seq, blk1_out)
    out1 = (
        out1.transpose(0, 1).reshape(seq_dim, blk2_in, nblocks2).permute(2, 0, 1)
    )  # (nblocks2, seq, blk2_in)
    out2 = torch.bmm(out1, w2_bfly.transpose(-1, -2))  # (nblocks2, seq, blk2_out)
    return out2.permute(1, 2, 0).reshape(*batch_shape, blk2_out * nblocks2)


def adapter_output(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, out_f: int) -> Tensor:
    """``monarch_forward`` of the adapter: ``postprocess(multiply(preprocess(x)))``."""
    nblocks, _, in_blksz = blkdiag1.shape
    if x.shape[-1] < nblocks * in_blksz:
        x = F.pad(x, (0, nblocks * in_blksz - x.shape[-1]))
    out = butterfly_multiply(x, blkdiag1, blkdiag2)
    return out[..., :out_f] if out.shape[-1] > out_f else out


def merged_delta(blkdiag1: Tensor, blkdiag2: Tensor, in_f: int, out_f: int) -> Tensor:
    """``MonarchLinear.train(False)``: ``monarch_forward(eye(in_features)).T`` added to ``dense``."""
    eye = torch.eye(in_f, dtype=blkdiag1.dtype)
    return adapter_output(eye, blkdiag1, blkdiag2, out_f).T
