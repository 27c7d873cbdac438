"""Merge-and-reinit (ReLoRA / ReMoRA) for any adapter and any model moreft can inject into.

Every ``K`` steps each adapter is merged into its base weight and re-initialised so ΔW = 0
again; the next cycle learns a new update on top. For MoRA with SHARING the grouping layout is
switched between STRIDED and ADJACENT so the accumulated update reaches a higher rank than one
layout allows (MoRA paper, Appendix B). The optimizer state of the re-initialised parameters
must be dropped too (:func:`reset_optimizer_state`); the training loop owns the learning-rate
restart.

After a merge the model's base weights differ from the pretrained ones, so an adapter saved
later holds only the last cycle: keep the merged base weights too. ``moreft train --merge-every K``
(:mod:`moreft.train.reinit`) does this: it saves them as ``merged_base.safetensors`` in every
checkpoint and in the run directory, and ``moreft eval`` / ``merge`` load them before the adapter.

MoRe keeps its fixed stride permutations across cycles (they are not re-drawn): its first factor
is re-drawn at random each cycle, which already lets the accumulated rank grow by up to
``nblocks * block_rank`` per cycle.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from .config import MoRAOperator, SharingLayout
from .inject import adapter_layers
from .layers import MoRALinear

_S, _A = SharingLayout.STRIDED, SharingLayout.ADJACENT


class RemoraCycle(str, enum.Enum):
    """The SHARING groupings a ReMoRA run steps through, one per merge.

    As the authors' ``mora_type`` (kongds/MoRA train.py, ``ResetReloraCallback.on_step_end``):
    1 = STRIDED in and out, 2 = ADJACENT in and out, 3 = ADJACENT in / STRIDED out, 4 = STRIDED in /
    ADJACENT out. ALTERNATE is their ``remora_types=2`` (1 <-> 2, both groupings flip; moreft's
    default); FOUR is their default ``remora_types=4`` (1 -> 2 -> 3 -> 4 -> 1).
    """

    ALTERNATE = "alternate"
    FOUR = "four"


#: ``(input layout, output layout)`` -> the next pair, per cycle.
_NEXT = {
    RemoraCycle.ALTERNATE: {(_S, _S): (_A, _A), (_A, _A): (_S, _S), (_A, _S): (_S, _A), (_S, _A): (_A, _S)},
    RemoraCycle.FOUR: {(_S, _S): (_A, _A), (_A, _A): (_A, _S), (_A, _S): (_S, _A), (_S, _A): (_S, _S)},
}


@torch.no_grad()
def merge_and_reinit(
    model: nn.Module, switch_sharing_layout: bool = True, cycle: RemoraCycle = RemoraCycle.ALTERNATE
) -> list[nn.Parameter]:
    """Merge every adapter into its base weight, then re-initialise it (ΔW = 0 again).

    Every layer is checked for NaN/Inf before any weight is written.

    Args:
        model: a model carrying a moreft adapter.
        switch_sharing_layout: for MoRA SHARING layers, step to the next groupings of ``cycle``.
        cycle: which groupings SHARING layers step through (:class:`RemoraCycle`).

    Returns:
        The re-initialised adapter parameters (whose optimizer state should be reset).

    Raises:
        MergeError: a merged weight would hold NaN/Inf (nothing is changed).
    """
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.check_mergeable()
    params: list[nn.Parameter] = []
    for layer in layers.values():
        layer.merge()
        layer.reset_parameters()
        layer.merged = False  # the old ΔW now lives in the base weight; the new one starts at 0
        if switch_sharing_layout and isinstance(layer, MoRALinear) and layer.operator is MoRAOperator.SHARING:
            pair = _NEXT[RemoraCycle(cycle)][layer.sharing_layout, layer.sharing_output_layout]
            layer.sharing_layout, layer.sharing_output_layout = pair
        params.extend(layer.adapter_params().values())
    return params


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Forget the optimizer's moments for ``params`` (they restart like fresh parameters)."""
    for p in params:
        optimizer.state.pop(p, None)
