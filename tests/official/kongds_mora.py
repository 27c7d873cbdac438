"""Transcription of MoRA's official computations (kongds/MoRA, peft-mora fork of peft 0.9).

Source: ``peft-mora/src/peft/tuners/lora/layer.py`` (commit a49fc1f), class ``LoraLayer``:
``update_layer`` (r̂ and the square ``lora_A``), ``_apply_mora`` (forward) and ``Linear.get_delta_weight``
(merge). Written from reading that code, step by step, in our own words; kept deliberately literal
(loops, the same padding and concatenations) so that it shares none of moreft's index maps.

One deliberate choice: ``mora_type == 6`` builds its cos/sin tables in float32
(``torch.arange(0, r, 2).float()``) and then casts; ``table_dtype`` lets a float64 test build them
in float64 instead, so the comparison can be tight (the float32 tables are tested separately).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MORA_TYPES = (1, 2, 3, 4, 6)


def r_hat(in_f: int, out_f: int, r: int) -> int:
    """``update_layer``: ``new_r = int(math.sqrt((in_features + out_features) * r) + 0.5)``; no cap."""
    return int(math.sqrt((in_f + out_f) * r) + 0.5)


def _uneven(width: int, r: int) -> tuple[int, int, int, int]:
    """The ``mr, nr = w//r+1, w//r`` / ``m, n = w - r*nr, r*mr - w`` split both branches use."""
    mr, nr = width // r + 1, width // r
    m, n = width - r * nr, r * mr - width
    return mr, nr, m, n


def _rope_tables(
    r: int, chunks: int, dtype: torch.dtype, table_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """``inv_freq = 1 / 10000 ** (arange(0, r, 2).float() / r)``; ``t = arange(rb1)``; cat(freqs, freqs)."""
    work = torch.float32 if table_dtype is None else table_dtype
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=work) / r))
    freqs = torch.outer(torch.arange(chunks, dtype=work), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (chunks, r)
    return emb.cos().unsqueeze(0).to(dtype), emb.sin().unsqueeze(0).to(dtype)  # (1, chunks, r)


def apply_mora(
    x: Tensor, weight: Tensor, in_f: int, out_f: int, mora_type: int, table_dtype: torch.dtype | None = None
) -> Tensor:
    """``LoraLayer._apply_mora``: compress, ``lora_A`` (an ``nn.Linear(r, r)``: ``y = in_x @ W.T``), decompress."""
    r = weight.shape[0]
    # -- compress ----------------------------------------------------------------------------
    if mora_type in (1, 4):
        sum_inter = in_f // r
        if in_f % r != 0:
            pad_size = r - in_f % r
            x = torch.cat([x, x[..., :pad_size]], dim=-1)  # their cyclic pad (fails if pad_size > in_f)
            sum_inter += 1
        in_x = x.view(*x.shape[:-1], sum_inter, r).sum(dim=-2)
    elif mora_type in (2, 3):
        mr, nr, m, n = _uneven(in_f, r)
        if m > 0:
            x_m = x[..., : m * mr].reshape(*x.shape[:-1], m, mr).sum(dim=-1)
            x_n = x[..., m * mr :].reshape(*x.shape[:-1], n, nr).sum(dim=-1)
            in_x = torch.cat([x_m, x_n], dim=-1)
        else:
            in_x = x.reshape(*x.shape[:-1], n, nr).sum(dim=-1)
    elif mora_type == 6:
        sum_inter = in_f // r
        rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
        if in_f % r != 0:
            pad_size = r - in_f % r
            x = torch.cat([x, x[..., :pad_size]], dim=-1)
            sum_inter += 1
        in_x = x.view(*x.shape[:-1], sum_inter, r)
        cos, sin = _rope_tables(r, rb1, x.dtype, table_dtype)
        rh_in_x = torch.cat((-in_x[..., r // 2 :], in_x[..., : r // 2]), dim=-1)
        in_x = in_x * cos + rh_in_x * sin
    else:
        raise ValueError(f"mora_type {mora_type} has no forward in the official code")
    out_x = in_x @ weight.T
    # -- decompress --------------------------------------------------------------------------
    if mora_type in (1, 3):
        repeat_time = out_f // r + (1 if out_f % r else 0)
        return torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    if mora_type in (2, 4):
        mr, nr, m, n = _uneven(out_f, r)
        if m > 0:
            return torch.cat(
                [
                    torch.repeat_interleave(out_x[..., :m], mr, dim=-1),
                    torch.repeat_interleave(out_x[..., m:], nr, dim=-1),
                ],
                dim=-1,
            )
        return torch.repeat_interleave(out_x, nr, dim=-1)
    out_x = out_x.reshape(*x.shape[:-1], -1)[..., :out_f]  # type 6: flatten the chunks
    if out_x.shape[-1] < out_f:
        repeat_time = out_f // out_x.shape[-1] + (1 if out_f % out_x.shape[-1] else 0)
        out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    return out_x


def _cyclic_columns(aw: Tensor, in_f: int, pad_size: int) -> Tensor:
    """Types 1 and 4: ``for i in range(in_f + pad_size): w[:, i % in_f] += aw[:, i % r]``."""
    r = aw.shape[0]
    w = aw.new_zeros(r, in_f)
    for i in range(in_f + pad_size):
        w[:, i % in_f] = w[:, i % in_f] + aw[:, i % r]
    return w


def _uneven_repeat(w: Tensor, width: int, dim: int) -> Tensor:
    """Types 2, 3 (columns) and 2, 4 (rows): ``repeat_interleave`` of the first ``m`` by ``mr``, the rest by ``nr``."""
    r = w.shape[dim]
    mr, nr, m, _ = _uneven(width, r)
    head, tail = w.narrow(dim, 0, m), w.narrow(dim, m, r - m)
    return torch.cat(
        [torch.repeat_interleave(head, mr, dim=dim), torch.repeat_interleave(tail, nr, dim=dim)], dim=dim
    )


def delta_weight(
    weight: Tensor, in_f: int, out_f: int, mora_type: int, table_dtype: torch.dtype | None = None
) -> Tensor:
    """``Linear.get_delta_weight`` for ``use_mora``: the dense ``(out, in)`` update merged into W."""
    aw = weight
    r = aw.shape[0]
    pad_size = r - in_f % r if in_f % r != 0 else 0
    repeat_time = out_f // r + (1 if out_f % r else 0)
    if mora_type == 1:
        w = _cyclic_columns(aw, in_f, pad_size)
        return torch.cat([w] * repeat_time, dim=0)[:out_f]
    if mora_type == 2:
        return _uneven_repeat(_uneven_repeat(aw, in_f, 1), out_f, 0)
    if mora_type == 3:
        w = _uneven_repeat(aw, in_f, 1)
        return torch.cat([w] * repeat_time, dim=0)[:out_f]
    if mora_type == 4:
        return _uneven_repeat(_cyclic_columns(aw, in_f, pad_size), out_f, 0)
    if mora_type != 6:
        raise ValueError(f"mora_type {mora_type} is not transcribed")
    # type 6: block-diagonal ``aw * cos_i + rotate(aw) * sin_i``, the last block wrapping cyclically
    w = aw.new_zeros(in_f + pad_size, in_f)
    rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
    rb2 = out_f // r if out_f % r == 0 else out_f // r + 1
    cos, sin = _rope_tables(r, rb1, aw.dtype, table_dtype)
    aw2 = torch.cat((aw[:, r // 2 :], -aw[:, : r // 2]), dim=-1)
    for i in range(rb1 - 1):
        w[i * r : (i + 1) * r, i * r : (i + 1) * r] = aw2 * sin[:, i] + aw * cos[:, i]
    i = rb1 - 1
    block = aw2 * sin[:, i] + aw * cos[:, i]
    w[i * r :, i * r :] = block[:, : r - pad_size]
    if pad_size > 0:
        w[i * r :, :pad_size] = block[:, r - pad_size :]  # assigned, as there (added in the forward)
    if in_f < out_f:
        return torch.cat([w] * rb2, dim=0)[:out_f]
    return w[:out_f]
