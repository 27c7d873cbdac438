"""The maths of moreft's adapters: pure functions, each fast version beside its slow reference."""

from __future__ import annotations


def ceil_div(n: int, d: int) -> int:
    """``ceil(n / d)`` for integers, exactly (``math.ceil(n / d)`` goes through a float and rounds).

    The one helper for block and chunk counts: MoRe's ``ceil(in / N)`` block sizes
    (:mod:`moreft.ops.monarch`) and MoRA's ``ceil(in / r)`` chunks (:mod:`moreft.ops.mora`,
    :mod:`moreft.ops.blocks`).
    """
    return -(-n // d)
