"""Property-based tests over random shapes and configs (hypothesis).

For any valid layer shape and method config (MoRe's Appendix C / E variants included): forward ==
base + x·ΔWᵀ, merge/unmerge round trip, save/load round trip, and MoRe's peft LoRA export
reproduces ΔW exactly.
"""

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import moreft
from moreft.export import export_rank, lora_factors
from moreft.ops.monarch import block_sizes

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


#: MoRe variants drawn beside the default (docs/more-variants.md).
MORE_VARIANTS = (
    {},
    {"alpha": 2.5},
    {"learnable_scale": True},
    {"learnable_scale": True, "scale_init": 0.5, "alpha": 0.5},
    {"composition": "multiplicative"},
    {"composition": "multiplicative", "learnable_scale": True},
    {"init_mode": "principal"},
    {"init_mode": "principal", "learnable_scale": True, "scale_init": 2.0},
)


def draw_more(draw, in_f: int, out_f: int) -> moreft.MoReConfig:
    """A MoRe config (default or a variant) that fits an ``(in, out)`` layer."""
    variant = draw(st.sampled_from(MORE_VARIANTS))
    width = out_f if variant.get("composition") == "multiplicative" else in_f  # M is (out, out) then
    nblocks = draw(st.integers(1, min(width, 6)))
    in_b, out_b = block_sizes(width, out_f, nblocks)
    return moreft.MoReConfig(
        target_modules=["lin"], nblocks=nblocks, block_rank=draw(st.integers(1, min(in_b, out_b))), **variant
    )


@st.composite
def layer_and_config(draw):
    in_f = draw(st.integers(2, 40))
    out_f = draw(st.integers(2, 40))
    method = draw(st.sampled_from(list(moreft.Method)))
    if method is moreft.Method.MORE:
        config = draw_more(draw, in_f, out_f)
    elif method is moreft.Method.MORA:
        operator = draw(st.sampled_from(list(moreft.MoRAOperator)))
        config = moreft.MoRAConfig(
            target_modules=["lin"],
            rank=draw(st.integers(1, 8)),
            operator=operator,
            sharing_layout=draw(st.sampled_from(list(moreft.SharingLayout))),
        )
    else:
        config = moreft.LoRAConfig(
            target_modules=["lin"], rank=draw(st.integers(1, 8)), alpha=draw(st.floats(0.5, 32))
        )
    return in_f, out_f, draw(st.booleans()), config


class Net(nn.Module):
    def __init__(self, in_f: int, out_f: int, bias: bool):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x)


def _adapted(in_f, out_f, bias, config, seed=0):
    torch.manual_seed(seed)
    net = moreft.inject(Net(in_f, out_f, bias), config)
    layer = net.lin
    for p in layer.adapter_params().values():
        nn.init.normal_(p, std=0.3)
    return net, layer


@SETTINGS
@given(layer_and_config())
def test_forward_is_base_plus_delta(case):
    in_f, out_f, bias, config = case
    net, layer = _adapted(in_f, out_f, bias, config)
    x = torch.randn(3, 2, in_f, dtype=torch.float64)
    expected = layer.base_layer(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(net(x), expected, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(layer_and_config())
def test_merge_unmerge_round_trip(case):
    in_f, out_f, bias, config = case
    net, layer = _adapted(in_f, out_f, bias, config)
    x = torch.randn(4, in_f, dtype=torch.float64)
    w0, y0 = layer.base_layer.weight.detach().clone(), net(x)
    layer.merge(safe=True)
    torch.testing.assert_close(net(x), y0, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-12, atol=1e-12)


def _base_copy(net, in_f, out_f, bias):
    """A plain ``Net`` holding the adapted net's base weights (no adapter)."""
    fresh = Net(in_f, out_f, bias)
    fresh.load_state_dict(
        {k.replace("lin.base_layer.", "lin."): v for k, v in net.state_dict().items() if "base_layer" in k}
    )
    return fresh


@SETTINGS
@given(layer_and_config())
def test_save_load_round_trip(case):
    in_f, out_f, bias, config = case
    net, _ = _adapted(in_f, out_f, bias, config)
    fresh = _base_copy(net, in_f, out_f, bias)
    x = torch.randn(4, in_f, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as d:
        moreft.save_adapter(net, d + "/a")
        moreft.load_adapter(fresh, d + "/a")
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


@SETTINGS
@given(layer_and_config())
def test_more_lora_export_is_exact(case):
    in_f, out_f, bias, config = case
    if config.method is not moreft.Method.MORE:
        return
    _, layer = _adapted(in_f, out_f, bias, config)
    rank = export_rank(config, None)
    a, b, err = lora_factors(layer, rank)
    assert err == 0.0 and a.shape == (rank, in_f)
    torch.testing.assert_close(b @ a, layer.delta_weight(), rtol=1e-12, atol=1e-12)


@st.composite
def more_layer(draw):
    """A MoRe config that fits a random ``(in, out)`` layer (every draw is a MoRe case)."""
    in_f, out_f = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    return in_f, out_f, draw(st.booleans()), draw_more(draw, in_f, out_f)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(more_layer())
def test_more_export_lora_loads_in_peft_with_equal_outputs(case):
    from peft import PeftModel

    in_f, out_f, bias, config = case
    net, _ = _adapted(in_f, out_f, bias, config)
    fresh = _base_copy(net, in_f, out_f, bias)
    x = torch.randn(4, in_f, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as d:
        report = moreft.export_lora(net, d + "/lora")
        assert report.rank == export_rank(config, None) and report.max_relative_error < 1e-12
        peft_model = PeftModel.from_pretrained(fresh, d + "/lora").eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(x), net(x), rtol=1e-10, atol=1e-10)
