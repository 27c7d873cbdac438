"""The choices of the adapter configs as enums, and the rules between MoRe's Appendix C / E options.

Kept apart from :mod:`moreft.config` (which re-exports the enums and declares the fields that use
them); nothing here imports from it. MoRe's variants: docs/more-variants.md.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from .errors import ConfigError


class Method(str, enum.Enum):
    """The adapter families moreft implements."""

    MORE = "more"
    MORA = "mora"
    LORA = "lora"


class MoRAOperator(str, enum.Enum):
    """MoRA's parameter-free compress/decompress pairs (MoRA paper, Section 4)."""

    TRUNCATION = "truncation"  # Eq. 4-5: keep the first r_hat inputs, write the first r_hat outputs
    SHARING = "sharing"  # Eq. 6-7: groups of inputs summed, groups of outputs share a row of M
    DECOUPLE = "decouple"  # Eq. 8: input cut into r_hat-chunks, each multiplied by M
    ROTATION = "rotation"  # Eq. 9-11: DECOUPLE with a RoPE-style rotation of chunk i


class SharingLayout(str, enum.Enum):
    """How SHARING groups inputs and outputs; ReMoRA alternates between the two.

    STRIDED groups ``{i, i + r_hat, i + 2 r_hat, ...}`` (the authors' fine-tuning default, their
    ``mora_type=1``: tile on decompress). ADJACENT groups runs of neighbours (their ``mora_type=2``:
    ``repeat_interleave`` on decompress; uneven sizes when ``r_hat`` does not divide the width).
    """

    STRIDED = "strided"
    ADJACENT = "adjacent"


class RHatRounding(str, enum.Enum):
    """How MoRA's default square size ``sqrt((in + out) * rank)`` becomes an integer.

    FLOOR is the paper's rule (moreft's default). ROUND is the authors' code,
    ``int(math.sqrt((in + out) * r) + 0.5)`` (kongds/MoRA, peft-mora ``LoraLayer.update_layer``),
    e.g. 64->64 at rank 4: 23 instead of 22.
    """

    FLOOR = "floor"
    ROUND = "round"


class BlockRule(str, enum.Enum):
    """How MoRe's block shapes follow from ``(in, out, nblocks)`` (``moreft.ops.monarch.block_shapes``).

    MOREFT: ``ceil(in / N)`` and ``ceil(out / N)``, all ``N`` blocks kept. OFFICIAL: the MoRe
    repository's ``MonarchLinear`` (SprocketLab/sparse_matrix_fine_tuning, src/layers/monarch_linear.py
    @89094ed): fully padded input blocks dropped, ``out_block = ceil(in_block * (out / in))`` in
    floating point, ``block_rank`` not bounded by the block sizes (theirs is checked by an ``assert``
    only, skipped under ``python -O``). OFFICIAL_INT: its earlier
    ``out_block = in_block * ceil(out / in)`` (src/models/layers/monarch_linear.py @8b2dbc5).
    """

    MOREFT = "moreft"
    OFFICIAL = "official"
    OFFICIAL_INT = "official-int"


class Composition(str, enum.Enum):
    """How MoRe's Monarch product ``M = P1·blkdiag2·P2·blkdiag1`` changes the frozen weight ``W``.

    ADDITIVE is the paper's Eq. 2: ``W' = W + c·M`` with ``M (out, in)``. MULTIPLICATIVE is the
    Appendix C ablation "monarch as a multiplicative factor instead of an additive factor as in
    BOFT": ``W' = (I + c·M)·W`` with a square ``M (out, out)``, so ``ΔW = c·M·W`` (identity at the
    start, as BOFT's factor). ``c`` is the output scale (``alpha``, times the learnable scalar).
    """

    ADDITIVE = "additive"
    MULTIPLICATIVE = "multiplicative"


class InitMode(str, enum.Enum):
    """How MoRe's factors start; ΔW = 0 at step 0 either way.

    ZERO: ``blkdiag1`` Kaiming-uniform per block, ``blkdiag2`` zero (the paper's); with a learnable
    scale initialised to 0 both factors are Kaiming-uniform and the scale is the zero (the authors'
    ``Scaler``). PRINCIPAL (Appendix E, Future Work 3): the factors start at the best MoRe
    approximation of ``W`` (block-wise SVD, :func:`moreft.ops.monarch_project.monarch_project`) and
    that same product is subtracted through a frozen copy of the starting factors saved with the
    adapter, the PiSSA idea without rewriting the base weight.
    """

    ZERO = "zero"
    PRINCIPAL = "principal"


def check_variant(
    composition: Composition, alpha: Any, learnable_scale: Any, scale_init: Any, init_mode: InitMode
) -> tuple[float, float]:
    """Validate the options together; returns ``(alpha, scale_init)`` as floats.

    Raises:
        ConfigError: ``alpha`` not a finite number > 0; ``learnable_scale`` not a bool; ``scale_init``
            not finite, or non-zero without ``learnable_scale``; the principal init with the
            multiplicative composition, or with a learnable scale starting at 0.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"alpha={alpha!r} must be a number > 0 and finite")
    if not isinstance(learnable_scale, bool):
        raise ConfigError(f"learnable_scale={learnable_scale!r} must be true or false")
    if (
        isinstance(scale_init, bool)
        or not isinstance(scale_init, (int, float))
        or not math.isfinite(scale_init)
    ):
        raise ConfigError(f"scale_init={scale_init!r} must be a finite number")
    if scale_init != 0.0 and not learnable_scale:
        raise ConfigError(
            f"scale_init={scale_init!r} needs learnable_scale=True (it is the start value of the "
            "learnable scalar)"
        )
    if init_mode is InitMode.PRINCIPAL and composition is Composition.MULTIPLICATIVE:
        raise ConfigError(
            "init_mode='principal' needs composition='additive': the multiplicative factor "
            "M (out x out) has no principal part of W to start from"
        )
    if init_mode is InitMode.PRINCIPAL and learnable_scale and scale_init == 0.0:
        raise ConfigError(
            "init_mode='principal' with learnable_scale needs scale_init != 0: a scale of 0 "
            "would multiply the principal components away"
        )
    return float(alpha), float(scale_init)
