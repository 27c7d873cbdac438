"""Low precision on the fused path: bf16 / fp16 bases keep fp32 adapters; under autocast the fused
op runs in the autocast dtype and agrees with the reference run under the same autocast."""

from __future__ import annotations

import contextlib

import pytest
import torch
from cases import cases
from conftest import assert_close, make_layer, randomize_adapters
from test_fused import Spy, expect_fused, literal, run

from moreft.ops import fused as fused_ops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].in_features == 20])
def test_low_precision_base_keeps_fp32_adapter(case, dtype, monkeypatch):
    spy = Spy(monkeypatch)
    layer = make_layer(case, dtype=dtype)
    randomize_adapters(layer)
    assert all(p.dtype == torch.float32 for p in layer.adapter_params().values())
    ref_layer = make_layer(case, dtype=torch.float32)
    ref_layer.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(4, case.in_features)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and spy.calls == 0  # mixed dtypes: the reference path, adapter in fp32
    assert_close(y.float(), literal(ref_layer, x).detach(), rtol=3e-2, atol=3e-2)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.adapter_params().values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on an fp32 layer: fused, in bf16
        y = ref_layer(x)
    assert spy.calls == int(expect_fused(ref_layer)) and y.dtype == torch.bfloat16
    assert_close(y.float(), literal(ref_layer, x).detach(), rtol=3e-2, atol=3e-2)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].in_features in (20, 23)])
def test_autocast_runs_the_fused_op_in_the_autocast_dtype(case, dtype, base_dtype, monkeypatch):
    """Under autocast the fused op casts every input to the autocast dtype, as autocast does for F.linear:
    the output has that dtype, the fp32 adapter gets fp32 gradients, and both agree with the reference
    path run under the same autocast (to the autocast dtype's rounding)."""
    spy = Spy(monkeypatch)
    layer = make_layer(case, dtype=base_dtype)
    randomize_adapters(layer, std=0.5)
    x = torch.randn(3, 9, case.in_features)

    def autocast(fused: bool):
        def call(layer, x):
            with contextlib.ExitStack() as stack:
                if not fused:
                    stack.enter_context(fused_ops.reference_mode())
                stack.enter_context(torch.autocast("cpu", dtype=dtype))
                return layer(x)

        return call

    ref = run(layer, x, autocast(False))
    assert spy.calls == 0
    got = run(layer, x, autocast(True))
    assert spy.calls == int(expect_fused(layer))
    assert got[0].dtype == ref[0].dtype == dtype and got[1].dtype == torch.float32
    assert _relative_error(got[0], ref[0]) < 2e-2 and _relative_error(got[1], ref[1]) < 2e-2
    assert got[2].keys() == ref[2].keys()
    params = dict(layer.named_parameters())
    for name, grad in got[2].items():
        assert grad.dtype == params[name].dtype, name  # fp32 adapter: fp32 gradients
        assert _relative_error(grad, ref[2][name]) < 5e-2, name
