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


class LoRALinear(AdapterLayer[LoRAConfig]):
    """``y = base(x) + (alpha / rank) · dropout(x) · Aᵀ · Bᵀ``.

    ``lora_A (rank, in)`` Kaiming-uniform, ``lora_B (out, rank)`` zero; input dropout. Per adapter in
    ``moreft_lora_lora_A`` / ``moreft_lora_lora_B`` (peft's own LoRA uses ``lora_``).
    """

    method = Method.LORA
    prefix = "moreft_lora_"
    adapter_param_names = ("lora_A", "lora_B")
    moreft_lora_lora_A: nn.ParameterDict
    moreft_lora_lora_B: nn.ParameterDict

    lora_A = property(
        lambda self: self.moreft_lora_lora_A[self.resolve_adapter()], doc="The active adapter's A."
    )
    lora_B = property(
        lambda self: self.moreft_lora_lora_B[self.resolve_adapter()], doc="The active adapter's B."
    )
    scaling = property(
        lambda self: self._scaling(self.resolve_adapter()), doc="The active adapter's alpha / rank."
    )

    def _scaling(self, adapter_name: str) -> float:
        config = self.adapter_configs[adapter_name]
        return config.alpha / config.rank

    def _new_params(self, config: LoRAConfig, adapter_name: str) -> dict[str, Tensor]:
        weight = self._base_weight()
        device, dtype = weight.device, adapter_dtype(weight)
        return {
            "lora_A": torch.empty(config.rank, self.in_features, device=device, dtype=dtype),
            "lora_B": torch.empty(self.out_features, config.rank, device=device, dtype=dtype),
        }

    @torch.no_grad()
    def _init_params(self, adapter_name: str, init_weights: bool) -> None:
        """``lora_A`` as ``nn.Linear`` initialises its weight; ``lora_B`` zero (or alike, for ΔW != 0)."""
        nn.init.kaiming_uniform_(self.moreft_lora_lora_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            self.moreft_lora_lora_B[adapter_name].zero_()
        else:
            nn.init.kaiming_uniform_(self.moreft_lora_lora_B[adapter_name], a=math.sqrt(5))

    def _delta_weight(self, adapter_name: str) -> Tensor:
        a, b = self.moreft_lora_lora_A[adapter_name], self.moreft_lora_lora_B[adapter_name]
        return (b @ a) * self._scaling(adapter_name)  # (out, rank) @ (rank, in)

    def _adapter_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        a, b = self.moreft_lora_lora_A[adapter_name], self.moreft_lora_lora_B[adapter_name]
        return F.linear(F.linear(self.adapter_dropout[adapter_name](x), a), b) * self._scaling(adapter_name)

    def _delta_adder(self, dtype: torch.dtype, adapter_name: str) -> DeltaAdder:
        device = self._base_weight().device
        a = self.moreft_lora_lora_A[adapter_name].detach().to(device=device, dtype=dtype)
        b = self.moreft_lora_lora_B[adapter_name].detach().to(device=device, dtype=dtype)
        return lowrank_adder(b, a, self._scaling(adapter_name))

    def _fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, adapter_name: str) -> Tensor:
        return lora_linear(
            x,
            weight,
            bias,
            self.moreft_lora_lora_A[adapter_name],
            self.moreft_lora_lora_B[adapter_name],
            self._scaling(adapter_name),
        )
