"""bf16 bases (train, merge in float32, save/load) and quantised bases (torchao int8 weight-only on CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_unchanged, randomize_adapters, snapshot
from safetensors.torch import load_file
from tiny import make_tiny_bert
from torch import nn

import moreft
from moreft.adapter_files import WEIGHTS_NAME
from moreft.config import LoRAConfig, MoRAConfig, MoReConfig
from moreft.errors import MergeError
from moreft.train import resolve_config, train

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = [
    MoReConfig(target_modules=["1"], nblocks=4, block_rank=2),
    LoRAConfig(target_modules=["1"], rank=4),
    MoRAConfig(target_modules=["1"], rank=4, operator="sharing"),
]
IDS = ["more", "lora", "mora"]
BF16_ULP = 2.0**-7  # spacing of bf16 values in [1, 2): a relative bound of one rounding step


def stack(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    """``Linear(32, 48) -> Linear(48, 40) -> GELU -> Linear(40, 3)``; the configs adapt layer ``"1"``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 3)).to(dtype)


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(3)).to(dtype)


# -- bf16 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_bf16_merge_adds_in_float32_and_rounds_once(config):
    model = moreft.inject(stack(torch.bfloat16), config)
    layer = model[1]
    assert layer.weight_dtype == torch.float32  # adapters train in fp32 on a bf16 base
    randomize_adapters(model, std=0.05)
    w0 = layer.base_layer.weight.detach().clone()
    exact = w0.float() + layer.delta_weight().detach().float()
    naive = w0 + layer.delta_weight().detach().to(torch.bfloat16)  # what adding in bf16 would give
    layer.merge(safe=True)
    merged = layer.base_layer.weight
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), exact.to(torch.bfloat16).float(), rtol=BF16_ULP, atol=0)
    assert (merged.float() - exact).abs().sum() <= (naive.float() - exact).abs().sum()
    layer.unmerge()  # not exact in bf16: back within the rounding of the merged values
    bound = float(exact.abs().max()) * BF16_ULP
    torch.testing.assert_close(layer.base_layer.weight.float(), w0.float(), rtol=0, atol=bound)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_bf16_save_load_round_trip(config, tmp_path):
    model = moreft.inject(stack(torch.bfloat16), config)
    randomize_adapters(model, std=0.05)
    moreft.save_adapter(model, tmp_path / "ad")
    assert {t.dtype for t in load_file(tmp_path / "ad" / WEIGHTS_NAME).values()} == {torch.float32}
    fresh = moreft.load_adapter(stack(torch.bfloat16), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(_x(torch.bfloat16)), model(_x(torch.bfloat16)))
    assert fresh[1].base_layer.weight.dtype == torch.bfloat16 and fresh[1].weight_dtype == torch.float32


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_bf16_training_run(bert, tmp_path):
    config = resolve_config(
        None,
        {
            "task": "sentiment",
            "model": bert,
            "method": "more",
            "block_rank": 2,
            "max_steps": 4,
            "batch_size": 8,
            "max_examples": 120,
            "eval_examples": 4,
            "max_length": 32,
            "lr": 1e-2,
            "log_every": 1,
            "precision": "bf16",
            "output_dir": str(tmp_path),
            "progress": False,
        },
    )
    result = train(config, quiet=True)
    assert result.metrics["train_loss"] == pytest.approx(result.metrics["train_loss"])  # finite, not NaN
    saved = load_file(result.run_dir / "adapter" / WEIGHTS_NAME)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if k.endswith("blkdiag2"))  # it learned
    _, _, model, _ = moreft.train.load_trained(result.run_dir)
    assert model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16


# -- torchao int8 weight-only ---------------------------------------------------------------------
def _int8_stack(seed: int = 0) -> nn.Sequential:
    quantization = pytest.importorskip("torchao.quantization")
    model = stack(seed=seed)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_adapters_train_on_an_int8_base_and_round_trip(config, tmp_path):
    model = moreft.inject(_int8_stack(), config)
    kind = moreft.quant.quantized_kind(model[1].base_layer.weight)
    assert kind is not None
    target = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):  # the adapted layer is in the middle: gradients flow through the int8 layers
        loss = nn.functional.mse_loss(model(_x()), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert moreft.quant.quantized_kind(model[1].base_layer.weight) == kind  # the base stayed quantised
    moreft.save_adapter(model, tmp_path / "ad")
    fresh = moreft.load_adapter(_int8_stack(), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(_x()), model(_x()))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_merging_into_an_int8_base_is_refused_with_a_clear_message(config):
    model = moreft.inject(_int8_stack(), config)
    randomize_adapters(model, std=0.05)
    before = snapshot(model)
    for merge in (lambda: moreft.merge(model), lambda: moreft.merge(model, safe=True), model[1].merge):
        with pytest.raises(
            MergeError,
            match=r"adapter layer '1' sits on a quantised base weight \(Int8\w*\); ΔW "
            r"cannot be added into it in place\. Use moreft\.quant\.merge_quantized",
        ):
            merge()
    assert [type(m) for _, m in model.named_modules()] == [t for _, t in before["types"]]
    assert not model[1].merged


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_merge_quantized_requantises_and_reports_the_error(config):
    quantization = pytest.importorskip("torchao.quantization")
    model = moreft.inject(_int8_stack(), config)
    randomize_adapters(model, std=0.05)
    x = _x()
    with torch.no_grad():
        expected = model(x)
    delta = model[1].delta_weight().detach()
    dequantised = model[1].base_layer.weight.dequantize()
    (report,) = moreft.quant.merge_quantized(model, quantization.Int8WeightOnlyConfig())
    assert isinstance(model[1], nn.Linear) and moreft.quant.quantized_kind(model[1].weight) == report.kind
    assert report.name == "1" and report.max_abs_delta == pytest.approx(float(delta.abs().max()))
    merged = model[1].weight.dequantize()
    # the report is the truth: requantised weight vs the exact float32 sum, and vs the update itself
    assert report.max_abs_error == pytest.approx(
        float((merged - (dequantised + delta)).abs().max()), rel=1e-5
    )
    assert report.delta_error == pytest.approx(
        float(((merged - dequantised) - delta).abs().max()) / report.max_abs_delta, rel=1e-5
    )
    assert 0 < report.max_abs_error < report.max_abs_delta  # int8 rounding keeps most of a 0.05-scale update
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.05)


def test_merge_quantized_refuses_a_float_base():
    pytest.importorskip("torchao")
    model = moreft.inject(stack(), dataclasses.replace(CONFIGS[0]))
    with pytest.raises(MergeError, match=r"cannot dequantise a Parameter weight here; only torchao"):
        moreft.quant.merge_quantized(model, object())


# -- some bases quantised: merging is all or nothing (a stand-in type, no torchao needed) ----------
class FakeInt8Tensor(nn.Parameter):
    """A plain float weight that :func:`moreft.quant.quantized_kind` takes for a torchao tensor."""


FakeInt8Tensor.__module__ = "torchao.fake"  # quantized_kind goes by the class's package


def _partly_quantised(config, quantised: tuple[str, ...]) -> nn.Sequential:
    """``stack()`` with adapters on layers 0 and 1 (randomised) and the ``quantised`` bases faked."""
    model = moreft.inject(stack(), dataclasses.replace(config, target_modules=["0", "1"]))
    randomize_adapters(model, std=0.05)
    for name in quantised:
        base = model.get_submodule(name).base_layer
        base.weight = FakeInt8Tensor(base.weight.detach(), requires_grad=False)
    return model


def test_the_fake_quantised_type_is_taken_for_torchao():
    model = _partly_quantised(CONFIGS[1], ("1",))
    assert moreft.quant.quantized_kind(model[1].base_layer.weight) == "FakeInt8Tensor"
    assert moreft.quant.quantized_kind(model[0].base_layer.weight) is None


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("safe", [False, True], ids=["plain", "safe"])
def test_merge_with_one_quantised_base_changes_nothing(config, safe):
    model = _partly_quantised(config, ("1",))
    before = snapshot(model)
    with pytest.raises(
        MergeError,
        match=r"^adapter layer '1' sits on a quantised base weight \(FakeInt8Tensor\); "
        r"ΔW cannot be added .* nothing was merged$",
    ):
        moreft.merge(model, safe=safe)
    assert_unchanged(model, before)  # layer '0' (a float base) was not merged either


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_merge_names_every_quantised_base(config):
    model = _partly_quantised(config, ("0", "1"))
    before = snapshot(model)
    with pytest.raises(
        MergeError,
        match=r"^2 adapter layers sit on quantised base weights: '0' \(FakeInt8Tensor\), "
        r"'1' \(FakeInt8Tensor\); .* nothing was merged$",
    ):
        moreft.merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("safe_merge", [False, True], ids=["plain", "safe"])
def test_peft_merge_and_unload_with_one_quantised_base_changes_nothing(safe_merge):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(stack(), dataclasses.replace(CONFIGS[1], target_modules=["0", "1"]))
    randomize_adapters(model, std=0.05)
    base = model.base_model.model[1].base_layer
    base.weight = FakeInt8Tensor(base.weight.detach(), requires_grad=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (
        lambda: model.merge_and_unload(safe_merge=safe_merge),
        lambda: model.merge_adapter(safe_merge=safe_merge),
    ):
        with pytest.raises(MergeError, match=r"^adapter layer '1' sits on a quantised base weight"):
            merge()
    assert not any(layer.merged for layer in moreft.adapter_layers(model).values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
