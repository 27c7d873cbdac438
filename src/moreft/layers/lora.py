"""LoRA layer, the baseline (Hu et al., 2021; as in microsoft/LoRA ``loralib``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig, Method
from ..ops.fused import lora_linear
from .base import AdapterLayer
from .linear import adapter_dtype
from .merging import DeltaAdder, lowrank_adder


class LoRALinear(AdapterLayer):
    """``y = base(x) + (alpha / rank) · dropout(x) · Aᵀ · Bᵀ``.

    ``lora_A (rank, in)`` Kaiming-uniform, ``lora_B (out, rank)`` zero; input dropout.
    """

    method = Method.LORA
    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.scaling = config.alpha / config.rank
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, config.rank, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ΔW = 0: ``lora_A`` as ``nn.Linear`` initialises its weight, ``lora_B`` zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, rank) @ (rank, in)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def _delta_adder(self, dtype: torch.dtype) -> DeltaAdder:
        kw = {"device": self.base_layer.weight.device, "dtype": dtype}
        return lowrank_adder(self.lora_B.detach().to(**kw), self.lora_A.detach().to(**kw), self.scaling)

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling)
