"""The table of the peft-method tests: tiny models (built from configs) x moreft configs.

Each model spec builds a model with fixed weights (equal seeds give equal models), its inputs and
the tensor to compare; each config entry is a moreft config factory. ``init_weights=False`` gives
a random non-zero ΔW, so a check that an adapter is (not) applied can fail.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import moreft


class MLP(nn.Module):
    """Two adapted layers with shapes no block count divides, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(20, 36)
        self.lin2 = nn.Linear(36, 23)
        self.head = nn.Linear(23, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(x)))))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    targets: Any
    modules_to_save: tuple[str, ...]
    inputs: Callable[[], dict[str, Tensor]]

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def out(self, model: nn.Module) -> Tensor:
        with torch.no_grad():
            y = model(**self.inputs())
        return y if isinstance(y, Tensor) else y.logits


def _tokens() -> dict[str, Tensor]:
    ids = torch.arange(2 * 7).reshape(2, 7) % 61 + 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS = (
    ModelSpec(
        "mlp", MLP, ("lin1", "lin2"), ("head",), lambda: {"x": torch.linspace(-2, 2, 3 * 20).reshape(3, 20)}
    ),
    ModelSpec("bert", tiny_bert, ("query", "key", "value", "dense"), ("classifier",), _tokens),
    ModelSpec("llama", tiny_llama, "all-linear", (), _tokens),
)

CONFIGS: dict[str, Callable[..., moreft.AdapterConfig]] = {
    "more-N4r2": lambda **kw: moreft.MoReConfig(nblocks=4, block_rank=2, **kw),
    "more-N3r1": lambda **kw: moreft.MoReConfig(nblocks=3, block_rank=1, **kw),
    "more-N1r4": lambda **kw: moreft.MoReConfig(nblocks=1, block_rank=4, **kw),
    # Appendix C / E variants (docs/more-variants.md)
    "more-alpha2-scale": lambda **kw: moreft.MoReConfig(
        nblocks=4, block_rank=2, alpha=2.0, learnable_scale=True, **kw
    ),
    "more-mult": lambda **kw: moreft.MoReConfig(nblocks=4, block_rank=2, composition="multiplicative", **kw),
    "more-principal": lambda **kw: moreft.MoReConfig(nblocks=4, block_rank=2, init_mode="principal", **kw),
    **{
        f"mora-{op.value}": functools.partial(moreft.MoRAConfig, rank=2, operator=op)
        for op in moreft.MoRAOperator
    },
    "mora-sharing-adjacent": lambda **kw: moreft.MoRAConfig(
        rank=2, operator="sharing", sharing_layout="adjacent", **kw
    ),
}


@dataclass(frozen=True)
class PeftCase:
    model: ModelSpec
    config_id: str

    def config(self, init_weights: bool = False, **kw: Any) -> moreft.AdapterConfig:
        kw = {
            "target_modules": self.model.targets,
            "modules_to_save": self.model.modules_to_save,
            "init_weights": init_weights,
            **kw,
        }
        return CONFIGS[self.config_id](**kw)

    def peft_model(self, seed: int = 0, adapter_seed: int = 1, **kw: Any):
        import peft

        model = self.model.make(seed)
        torch.manual_seed(adapter_seed)
        return peft.get_peft_model(model, self.config(**kw))


def peft_cases(models: tuple[str, ...] | None = None) -> list:
    """Every model x config pair as pytest params."""
    return [
        pytest.param(PeftCase(m, c), id=f"{m.name}-{c}")
        for m in MODELS
        if models is None or m.name in models
        for c in CONFIGS
    ]
