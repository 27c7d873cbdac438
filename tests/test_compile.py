"""Every method and every MoRA operator runs under ``torch.compile(fullgraph=True)`` (default inductor, CPU).

One model chains one adapted layer of each kind (square, rectangular and non-divisible widths),
so a single compilation covers them all: no graph break (``fullgraph``), no dynamo warning (its
``functools.lru_cache`` notice included), outputs and every gradient equal to eager mode.
Compiling takes ~10-20 s per test on 2 cores, so there are only a few.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import randomize_adapters
from torch import nn

from moreft import LoRAConfig, MoRAConfig, MoRAOperator, MoReConfig, SharingLayout
from moreft.layers import LoRALinear, MoRALinear, MoReLinear

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = (  # (layer type, config, in, out): widths that neither nblocks nor r_hat divide, in < out, in > out
    (LoRALinear, LoRAConfig(rank=4, alpha=8.0), 24, 36),
    (MoReLinear, MoReConfig(nblocks=4, block_rank=2), 36, 23),
    (MoReLinear, MoReConfig(nblocks=4, block_rank=2), 23, 24),  # input padded: the dense-A path
    (MoRALinear, MoRAConfig(rank=2, operator=MoRAOperator.TRUNCATION), 24, 20),
    (MoRALinear, MoRAConfig(rank=2, operator=MoRAOperator.SHARING), 20, 37),
    (
        MoRALinear,
        MoRAConfig(rank=2, operator=MoRAOperator.SHARING, sharing_layout=SharingLayout.ADJACENT),
        37,
        24,
    ),
    (MoRALinear, MoRAConfig(rank=2, operator=MoRAOperator.DECOUPLE), 24, 36),
    (MoRALinear, MoRAConfig(rank=2, operator=MoRAOperator.ROTATION), 36, 24),
)


class Chain(nn.Module):
    """The adapted layers of :data:`STAGES` in sequence, a tanh between them."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            cls(nn.Linear(i, o, dtype=dtype).requires_grad_(False), cfg, name=f"l{k}")
            for k, (cls, cfg, i, o) in enumerate(STAGES)
        )
        for layer in self.layers:
            randomize_adapters(layer, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad
    return y.detach(), grads


def compiled(model: nn.Module) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True)


def test_training_step_compiles_whole_and_equals_eager():
    dtype, tol = torch.float64, 1e-10
    model = Chain(dtype)
    x = torch.randn(2, 5, 24, dtype=dtype)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = step(compiled(model), x)
    assert not [str(w.message) for w in seen if "ynamo" in str(w.message)]
    ref = step(model, x)
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
    assert got[1].keys() == ref[1].keys() and len(ref[1]) == 1 + 2 * 3 + 5  # x, LoRA/MoRe factor pairs, MoRA
    for name, grad in ref[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=tol, atol=tol, msg=name)


def test_compiled_fp32_inference_and_wide_batches():
    """fp32, ``no_grad`` (the custom ops without autograd) and a wide batch (the ``W + ΔW`` paths)."""
    model = Chain(torch.float32)
    fast = compiled(model)
    x = torch.randn(96, 24)  # 96 >= 2·in everywhere: forward and ∂x through W + ΔW
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=2e-5, atol=2e-5)
    got, ref = step(fast, x), step(model, x)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-5, atol=2e-5)
    for name, grad in ref[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=2e-5, atol=2e-5, msg=name)


def test_compiled_under_bf16_autocast_equals_eager():
    """Trainer(bf16=True, torch_compile=True): the fused ops run in bf16 inside the graph, no graph break."""
    model = Chain(torch.float32)
    x = torch.randn(4, 6, 24)

    class Autocast(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x)

    got, ref = step(compiled(Autocast(model)), x), step(Autocast(model), x)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert relative(got[0], ref[0]) < 2e-2
    assert got[1].keys() == ref[1].keys()
    for name, grad in ref[1].items():
        assert got[1][name].dtype == grad.dtype == torch.float32, name
        assert relative(got[1][name], grad) < 5e-2, name
