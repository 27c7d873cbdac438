"""Shared models and helpers of the core-library tests (imported as ``from conftest import ...``)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

import moreft
from moreft.layers import LAYER_CLASSES, AdapterLayer, is_conv1d


class TinyNet(nn.Module):
    """``lin`` (the layer the table adapts), a LayerNorm ``norm`` and a 3-way ``head``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float32,
        name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, dtype=dtype)
        self.norm = nn.LayerNorm(out_features, dtype=dtype)
        self.head = nn.Linear(out_features, 3, dtype=dtype)
        if name_or_path is not None:  # looks like a transformers model's config to moreft
            self.config = SimpleNamespace(_name_or_path=name_or_path, model_type=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.lin(x))))


def make_net(case_or_shape, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> TinyNet:
    """A TinyNet for a table case or an ``(in, out)`` pair; equal seeds give equal weights."""
    shape = (
        case_or_shape
        if isinstance(case_or_shape, tuple)
        else (case_or_shape.in_features, case_or_shape.out_features)
    )
    torch.manual_seed(seed)
    return TinyNet(*shape, dtype=dtype, **kw)


def make_layer(case, dtype: torch.dtype = torch.float32, seed: int = 0, conv1d: bool = False) -> AdapterLayer:
    """The case's adapter layer around a fresh ``nn.Linear`` (or transformers ``Conv1D``)."""
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(case.out_features, case.in_features).to(dtype)
        nn.init.normal_(base.bias, std=0.1)
    else:
        base = nn.Linear(case.in_features, case.out_features, dtype=dtype)
    return LAYER_CLASSES[case.method](base, case.config, name="lin")


def adapter_layer_list(model_or_layer: nn.Module) -> list[AdapterLayer]:
    if isinstance(model_or_layer, AdapterLayer):
        return [model_or_layer]
    return list(moreft.adapter_layers(model_or_layer).values())


@torch.no_grad()
def randomize_adapters(model_or_layer: nn.Module, std: float = 0.1, seed: int = 1234) -> None:
    """Fill every adapter parameter (found through ``layer.adapter_params()``) with N(0, std²)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in adapter_layer_list(model_or_layer):
        for p in layer.adapter_params().values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)


def more_literal(layer: AdapterLayer, x: Tensor) -> Tensor:
    """``x · ΔWᵀ`` of a MoRe layer's active adapter from the config's formula and the paper-literal
    product (``moreft.ops.more_variants.variant_reference``), with the layer's own tensors."""
    from moreft.ops.more_variants import variant_reference

    c, name = layer.config, layer.resolve_adapter()
    coeff = c.alpha * layer.more_scale[name] if c.learnable_scale else c.alpha
    weight = (
        layer.base_layer.weight.T if is_conv1d(layer.base_layer) else layer.base_layer.weight
    )  # (out, in)
    kw = {}
    if c.composition is moreft.Composition.MULTIPLICATIVE:
        kw["weight"] = weight.to(x.dtype)
    if c.init_mode is moreft.InitMode.PRINCIPAL:
        coeff0 = (
            c.alpha * torch.full_like(layer.more_scale[name], c.scale_init) if c.learnable_scale else c.alpha
        )
        kw["init"] = (layer.more_init_blkdiag1[name], layer.more_init_blkdiag2[name], coeff0)
    return variant_reference(x, layer.blkdiag1, layer.blkdiag2, layer.out_features, coeff, **kw)


def assert_close(
    actual: Tensor, expected: Tensor, tol=None, *, rtol: float | None = None, atol: float | None = None
) -> None:
    """``allclose`` with a case's tolerances for ``expected.dtype``; atol scales with |expected|."""
    if tol is not None:
        rtol, atol = tol.of(expected.dtype)
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: module types, tensors, requires_grad, config."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": moreft.adapter_config(model),
        "merged": {n: layer.merged for n, layer in moreft.adapter_layers(model).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["config"] == before["config"]
    assert after["merged"] == before["merged"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True)


def module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to OpenMP spin-waits on a busy box
    (with 2 threads a 6x24 matmul took ~30 ms on a loaded 2-core machine, 0.07 ms with 1).
    Used by a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def net24() -> TinyNet:
    """A fresh 24 -> 24 TinyNet."""
    return make_net((24, 24))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """(Session-wide; ``test_train*.py``.) A 2-layer, 32-wide BERT classifier (random weights) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from moreft.models import minilm_dir

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
