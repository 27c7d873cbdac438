"""Table-driven layer tests: every method and variant on every shape (see tests/cases.py)."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, cases, expected_params, expected_r_hat, expected_rank, more_structural_rank
from conftest import assert_close, make_layer, randomize_adapters
from torch import nn

import moreft
from moreft import Method, MoRALinear

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
BASES = [pytest.param(False, id="linear"), pytest.param(True, id="conv1d")]


def test_table_covers_every_method_operator_and_layout():
    seen = {
        (c.method, getattr(c.config, "operator", None), getattr(c.config, "sharing_layout", None))
        for c in CASES
    }
    assert {m for m, _, _ in seen} == set(Method)
    assert {op for m, op, _ in seen if m is Method.MORA} == set(moreft.MoRAOperator)
    assert {lay for _, op, lay in seen if op is moreft.MoRAOperator.SHARING} == set(moreft.SharingLayout)


def _x(case, dtype=torch.float32, batch=(2, 5)):
    return torch.randn(*batch, case.in_features, generator=torch.Generator().manual_seed(7), dtype=dtype)


@pytest.mark.parametrize("conv1d", BASES)
@pytest.mark.parametrize("case", cases())
def test_zero_delta_at_init_forward_equals_base_exactly(case, conv1d):
    layer = make_layer(case, conv1d=conv1d).eval()
    x = _x(case)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert not layer.delta_weight().any()
    assert layer.delta_weight().shape == (case.out_features, case.in_features)


@pytest.mark.parametrize("conv1d", BASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", cases())
def test_forward_equals_base_plus_x_delta_t(case, dtype, conv1d):
    layer = make_layer(case, dtype=dtype, conv1d=conv1d).eval()
    randomize_adapters(layer)
    assert all(p.dtype == dtype for p in layer.adapter_params().values())
    x = _x(case, dtype)
    delta = layer.delta_weight()
    assert delta.abs().max() > 0
    assert_close(layer(x), layer.base_layer(x) + x @ delta.T, case.tol)
    assert_close(layer(x[0, 0]), layer.base_layer(x[0, 0]) + delta @ x[0, 0], case.tol)  # 1-D input


@pytest.mark.parametrize("case", cases())
def test_gradients_reach_adapter_params_only(case):
    layer = make_layer(case)
    layer.base_layer.requires_grad_(False)
    layer(_x(case)).square().sum().backward()  # at init ΔW = 0 but the zero factor gets a gradient
    assert sum(float(p.grad.abs().sum()) for p in layer.adapter_params().values()) > 0
    layer.zero_grad()
    randomize_adapters(layer)
    layer(_x(case)).square().sum().backward()
    for name, p in layer.adapter_params().items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert all(p.grad is None for p in layer.base_layer.parameters())


@pytest.mark.parametrize("conv1d", BASES)
@pytest.mark.parametrize("case", cases())
def test_merge_equals_unmerged_and_round_trip(case, conv1d):
    layer = make_layer(case, conv1d=conv1d).eval()
    randomize_adapters(layer)
    x = _x(case)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged_weight = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight().detach()
    assert_close(merged_weight, w0 + (delta.T if conv1d else delta), case.tol)
    assert_close(layer(x), unmerged, case.tol)
    assert_close(layer.base_layer(x), unmerged, case.tol)  # the adapter is inside the weight now
    layer.merge()  # idempotent: merging twice == once
    assert torch.equal(layer.base_layer.weight, merged_weight) and layer.merged
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base_layer.weight, w0, case.tol)
    restored = layer.base_layer.weight.detach().clone()
    layer.unmerge()  # idempotent
    assert torch.equal(layer.base_layer.weight, restored) and not layer.merged
    assert_close(layer(x), unmerged, case.tol)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", cases())
def test_train_and_eval_never_merge_or_unmerge(case, merged):
    layer = make_layer(case)
    randomize_adapters(layer)
    if merged:
        layer.merge()
    weight = layer.base_layer.weight.detach().clone()
    for mode in (layer.eval, layer.train, layer.eval, layer.train):
        mode()
        assert layer.merged is merged
        assert torch.equal(layer.base_layer.weight, weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", cases())
def test_safe_merge_refuses_non_finite_and_changes_nothing(case, bad):
    for param_name in make_layer(case).adapter_params():
        layer = make_layer(case)
        randomize_adapters(layer)
        with torch.no_grad():
            layer.adapter_params()[param_name].view(-1)[0] = bad  # first element: never padding
        weight = layer.base_layer.weight.detach().clone()
        with pytest.raises(moreft.MergeError, match=r"merging adapter layer 'lin' would write \d+ NaN/Inf"):
            layer.merge(safe=True)
        assert not layer.merged, param_name
        assert torch.equal(layer.base_layer.weight, weight), param_name


@pytest.mark.parametrize("case", cases())
def test_parameter_count_matches_formula(case):
    layer = make_layer(case)
    n = sum(p.numel() for p in layer.adapter_params().values())
    assert n == expected_params(case)
    base_ids = {id(p) for p in layer.base_layer.parameters()}
    assert sum(p.numel() for p in layer.parameters() if id(p) not in base_ids) == n
    if case.method is Method.MORA:
        assert layer.r_hat == expected_r_hat(case)
        assert layer.matrix.shape == (layer.r_hat, layer.r_hat)


@pytest.mark.parametrize("case", cases())
def test_delta_weight_rank_for_random_parameters(case):
    layer = make_layer(case, dtype=torch.float64)
    randomize_adapters(layer, std=1.0)
    rank = int(torch.linalg.matrix_rank(layer.delta_weight().detach()))
    assert rank == expected_rank(case)
    if (
        case.method is Method.MORE
        and case.config.composition is moreft.Composition.ADDITIVE
        and case.config.init_mode is moreft.InitMode.ZERO
    ):
        c = case.config
        # every table shape gives each block enough real rows and columns: the full rank is reached
        assert rank == min(c.nblocks * c.block_rank, case.in_features, case.out_features)


def test_more_rank_is_lost_where_a_block_sees_padding_only():
    """in=10 in 4 blocks of 3: the last block has 1 real input, so rank 7 < nblocks*block_rank = 8."""
    assert more_structural_rank(10, 12, 4, 2) == 7
    config = moreft.MoReConfig(nblocks=4, block_rank=2)
    layer = moreft.MoReLinear(nn.Linear(10, 12, dtype=torch.float64), config)
    randomize_adapters(layer, std=1.0)
    assert int(torch.linalg.matrix_rank(layer.delta_weight().detach())) == 7


@pytest.mark.parametrize("case", cases())
def test_bf16_base(case):
    layer = make_layer(case, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.float32 for p in layer.adapter_params().values())
    randomize_adapters(layer, std=0.05)
    x = _x(case, torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        delta = layer.delta_weight()
        expected = layer.base_layer(x).float() + x.float() @ delta.T
    assert y.dtype == torch.bfloat16 and delta.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=float(expected.abs().max()) * 2**-7)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    exact = w0.float() + delta  # the sum taken in fp32, then one rounding to bf16 (2^-8 relative)
    torch.testing.assert_close(layer.base_layer.weight.float(), exact, rtol=2**-8, atol=1e-30)
    layer.unmerge()
    step = (w0.float().abs() + delta.abs()).max()  # bf16 keeps 8 bits: two roundings of this size
    torch.testing.assert_close(layer.base_layer.weight.float(), w0.float(), rtol=0, atol=float(step) * 2**-6)


@pytest.mark.parametrize("case", cases())
def test_dropout_only_acts_in_training(case):
    config = type(case.config)(
        **{**{k: v for k, v in case.config.to_dict().items() if k != "method"}, "dropout": 0.5}
    )
    layer = make_layer(case)
    noisy = type(layer)(nn.Linear(case.in_features, case.out_features), config, name="lin")
    noisy.load_state_dict(layer.state_dict())
    randomize_adapters(layer)
    randomize_adapters(noisy)
    x = _x(case)
    assert_close(noisy.eval()(x), layer.eval()(x), case.tol)
    torch.manual_seed(0)
    assert not torch.allclose(noisy.train()(x), layer(x))


@pytest.mark.parametrize("case", cases(Method.MORA, operators=(moreft.MoRAOperator.SHARING,)))
def test_mora_sharing_layout_switch_changes_delta(case):
    layer = make_layer(case, dtype=torch.float64)
    assert isinstance(layer, MoRALinear)
    randomize_adapters(layer)
    before = layer.delta_weight().detach()
    other = next(lay for lay in moreft.SharingLayout if lay is not layer.sharing_layout)
    layer.sharing_layout = other
    after = layer.delta_weight().detach()
    assert not torch.allclose(before, after)
    x = _x(case, torch.float64)
    assert_close(layer(x), layer.base_layer(x) + x @ after.T, case.tol)


def test_wrapping_keeps_base_layer_object_and_repr():
    base = nn.Linear(24, 24)
    layer = moreft.MoRALinear(base, moreft.MoRAConfig(rank=2, operator="decouple"), name="lin")
    assert layer.base_layer is base
    assert "r_hat=9" in repr(layer) and "operator=decouple" in repr(layer) and "merged=False" in repr(layer)
    assert isinstance(layer, moreft.AdapterModule)
