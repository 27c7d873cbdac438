"""MoRe layer: a Monarch-rectangular adapter around a linear layer (MoRe paper, Section 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlockRule, Method, MoReConfig
from ..errors import ConfigError
from ..ops.fused import fold_more_a, fold_more_b, more_linear
from ..ops.monarch import block_shapes, more_delta_weight, more_forward
from ..ops.triton_more import more_triton, use_triton
from .base import AdapterLayer
from .linear import adapter_dtype
from .merging import DeltaAdder, blocked_lowrank_adder, lowrank_adder


class MoReLinear(AdapterLayer[MoReConfig]):
    """``y = base(x) + dropout(x · ΔWᵀ)`` with ``ΔW = P1·blkdiag2·P2·blkdiag1``; no alpha.

    Parameters (named as in the paper's pseudocode, per adapter in ``more_blkdiag1`` /
    ``more_blkdiag2``): ``blkdiag1 (nblocks, block_rank, in_block)`` applied first, Kaiming-uniform
    per block; ``blkdiag2 (nblocks, out_block, block_rank)``, zero, so ΔW = 0 at the start.
    Dropout acts on the adapter output, as in the authors' code.

    ``config.block_rule`` picks the block shapes (``moreft.ops.monarch.block_shapes``); under the
    official rules the layer may hold fewer than ``nblocks`` blocks and neither check below applies.

    Raises:
        ConfigError: ``nblocks > in_features``, or ``block_rank`` above the smaller block size
            (extra rank could never be used).
    """

    method = Method.MORE
    prefix = "more_"
    adapter_param_names = ("blkdiag1", "blkdiag2")
    more_blkdiag1: nn.ParameterDict
    more_blkdiag2: nn.ParameterDict

    blkdiag1 = property(lambda self: self.more_blkdiag1[self._one()], doc="The active adapter's blkdiag1.")
    blkdiag2 = property(lambda self: self.more_blkdiag2[self._one()], doc="The active adapter's blkdiag2.")

    def _new_params(self, config: MoReConfig, adapter_name: str) -> dict[str, Tensor]:
        n, r, name = config.nblocks, config.block_rank, self.name
        moreft_rule = config.block_rule is BlockRule.MOREFT
        if moreft_rule and n > self.in_features:
            raise ConfigError(f"nblocks={n} must be <= in_features={self.in_features} of {name!r}")
        n, in_block, out_block = block_shapes(self.in_features, self.out_features, n, config.block_rule)
        if moreft_rule and r > min(in_block, out_block):
            raise ConfigError(f"block_rank={r} must be <= min(in_block, out_block)="
                              f"{min(in_block, out_block)} for {name!r} "
                              f"({self.in_features}->{self.out_features} in {n} blocks)")
        weight = self._base_weight()
        device, dtype = weight.device, adapter_dtype(weight)
        return {"blkdiag1": torch.empty(n, r, in_block, device=device, dtype=dtype),
                "blkdiag2": torch.empty(n, out_block, r, device=device, dtype=dtype)}

    @torch.no_grad()
    def _init_params(self, adapter_name: str, init_weights: bool) -> None:
        """Kaiming-uniform ``blkdiag1`` with each block's own fan-in; ``blkdiag2`` zero (or alike, for ΔW != 0)."""
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        bound = 1.0 / math.sqrt(b1.shape[-1])  # kaiming_uniform_(a=sqrt(5)) per block
        b1.uniform_(-bound, bound)
        if init_weights:
            b2.zero_()
        else:
            b2.uniform_(-1.0 / math.sqrt(b2.shape[-1]), 1.0 / math.sqrt(b2.shape[-1]))

    def _delta_weight(self, adapter_name: str) -> Tensor:
        return more_delta_weight(self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name],
                                 self.in_features, self.out_features)

    def _adapter_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        dropout = self.adapter_dropout[adapter_name]
        if use_triton(x):  # CUDA: both products and both permutations in fused Triton kernels
            return dropout(more_triton(x, b1, b2, self.out_features))
        return dropout(more_forward(x, b1, b2, self.out_features))

    def _delta_adder(self, dtype: torch.dtype, adapter_name: str) -> DeltaAdder:
        device = self._base_weight().device
        b1 = self.more_blkdiag1[adapter_name].detach().to(device=device, dtype=dtype)
        b2 = self.more_blkdiag2[adapter_name].detach().to(device=device, dtype=dtype)
        b = fold_more_b(b2, self.out_features)  # (out, N·r)
        if b1.shape[0] * b1.shape[2] == self.in_features:
            return blocked_lowrank_adder(b, b1)
        return lowrank_adder(b, fold_more_a(b1, self.in_features), 1.0)

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, adapter_name: str) -> Tensor:
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        if use_triton(x):
            y = F.linear(x, weight, bias)  # (..., out); not saved by autograd, so added to in place
            return y.add_(more_triton(x, b1, b2, self.out_features))
        return more_linear(x, weight, bias, b1, b2)
