"""MoRe's Appendix C / E variants and the Monarch projection (docs/more-variants.md).

The generic layer, peft, export and property tests run these variants through the shared tables
(tests/cases.py, tests/peft_models.py); here are the checks specific to each: the projection's
optimality, each formula against an independent dense computation, the step-0 behaviour of every
init, and what merging a W-dependent ΔW keeps.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import more_literal, randomize_adapters
from torch import nn

import moreft
from moreft import Composition, InitMode, MoReConfig, MoReLinear
from moreft.ops.monarch import block_shapes, more_delta_weight
from moreft.ops.monarch_project import monarch_project, monarch_project_reference, sub_block_terms
from moreft.remora import merge_and_reinit

pytestmark = pytest.mark.usefixtures("one_thread")

#: (out, in, nblocks, block_rank): square, wide, tall, uneven, N < r, N = 1, and a wide block rank.
PROJECT_SHAPES = [
    (24, 24, 4, 2),
    (36, 20, 4, 4),
    (20, 36, 3, 3),
    (37, 23, 4, 1),
    (23, 37, 2, 4),
    (24, 24, 1, 4),
    (24, 24, 4, 6),
]


def _w(out_f, in_f, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def eckart_young_error(weight: torch.Tensor, nblocks: int, block_rank: int) -> float:
    """``||W - best||_F`` from first principles: per sub-block, the singular values beyond its term count."""
    out_f, in_f = weight.shape
    n, in_blk, out_blk = block_shapes(in_f, out_f, nblocks)
    counts = {bk: len(ms) for bk, ms in sub_block_terms(n, block_rank).items()}
    total = 0.0
    for b in range(n):
        rows = [p * n + b for p in range(out_blk) if p * n + b < out_f]
        for k in range(n):
            cols = [c for c in range(k * in_blk, (k + 1) * in_blk) if c < in_f]
            if not rows or not cols:
                continue
            s = torch.linalg.svdvals(weight[rows][:, cols])
            total += float(s[counts.get((b, k), 0) :].square().sum())
    return math.sqrt(total)


# -- the Monarch projection ----------------------------------------------------------------------
@pytest.mark.parametrize("out_f, in_f, n, r", PROJECT_SHAPES)
def test_projection_equals_reference_and_is_optimal_per_block(out_f, in_f, n, r):
    w = _w(out_f, in_f)
    fast = more_delta_weight(*monarch_project(w, n, r), in_f, out_f)
    ref = more_delta_weight(*monarch_project_reference(w, n, r), in_f, out_f)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    err = float(torch.linalg.matrix_norm(w - fast))
    assert err == pytest.approx(eckart_young_error(w, n, r), rel=1e-10)
    torch.testing.assert_close(
        more_delta_weight(*monarch_project(fast, n, r), in_f, out_f), fast, rtol=1e-10, atol=1e-10
    )  # a projection: idempotent


@pytest.mark.parametrize("out_f, in_f, n, r", PROJECT_SHAPES)
def test_projection_recovers_a_matrix_of_that_structure_exactly(out_f, in_f, n, r):
    nb, in_blk, out_blk = block_shapes(in_f, out_f, n)
    gen = torch.Generator().manual_seed(3)
    b1 = torch.randn(nb, r, in_blk, generator=gen, dtype=torch.float64)
    b2 = torch.randn(nb, out_blk, r, generator=gen, dtype=torch.float64)
    target = more_delta_weight(b1, b2, in_f, out_f)
    p1, p2 = monarch_project(target, n, r)
    assert p1.shape == b1.shape and p2.shape == b2.shape
    torch.testing.assert_close(more_delta_weight(p1, p2, in_f, out_f), target, rtol=1e-10, atol=1e-10)


def test_projection_error_decreases_with_block_rank_and_padding_stays_zero():
    w = _w(37, 23, seed=5)
    errors = [
        float(torch.linalg.matrix_norm(w - more_delta_weight(*monarch_project(w, 4, r), 23, 37)))
        for r in range(1, 7)
    ]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errors)) and errors[0] > errors[-1]
    p1, p2 = monarch_project(
        w, 4, 3
    )  # in 23 = 4 blocks of 6 (one padded column), out 37 = 4 x 10 (3 padded rows)
    assert not p1[3, :, 5].any()
    assert not p2[1:, 9, :].any() and p2[0, 9, :].any()  # rows 9*4 + b >= 37 for b >= 1


def test_projection_beats_perturbed_factors():
    """Local check of optimality: no small move of the factors gets closer to W."""
    w = _w(24, 24, seed=9)
    p1, p2 = monarch_project(w, 4, 2)
    best = float(torch.linalg.matrix_norm(w - more_delta_weight(p1, p2, 24, 24)))
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        q1 = p1 + 1e-3 * torch.randn(p1.shape, generator=gen, dtype=p1.dtype)
        q2 = p2 + 1e-3 * torch.randn(p2.shape, generator=gen, dtype=p2.dtype)
        assert float(torch.linalg.matrix_norm(w - more_delta_weight(q1, q2, 24, 24))) >= best


def test_projection_refuses_bad_input():
    with pytest.raises(moreft.ConfigError, match=r"nblocks=9 must be <= in_features=8"):
        monarch_project(torch.zeros(4, 8), 9, 1)
    with pytest.raises(moreft.ConfigError, match=r"block_rank=0 must be an integer >= 1"):
        monarch_project(torch.zeros(4, 8), 2, 0)
    with pytest.raises(moreft.ConfigError, match=r"must be a matrix"):
        monarch_project(torch.zeros(4), 1, 1)


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0}, r"alpha=0 must be a number > 0 and finite"),
        ({"alpha": float("inf")}, r"alpha=inf must be a number > 0"),
        ({"scale_init": 0.5}, r"scale_init=0.5 needs learnable_scale=True"),
        ({"learnable_scale": True, "scale_init": float("nan")}, r"scale_init=nan must be a finite number"),
        ({"learnable_scale": "yes"}, r"learnable_scale='yes' must be true or false"),
        ({"composition": "product"}, r"composition='product' is not one of 'additive', 'multiplicative'"),
        ({"init_mode": "svd"}, r"init_mode='svd' is not one of 'zero', 'principal'"),
        (
            {"init_mode": "principal", "composition": "multiplicative"},
            r"init_mode='principal' needs composition=",
        ),
        ({"init_mode": "principal", "learnable_scale": True}, r"needs scale_init != 0"),
    ],
)
def test_config_refuses_bad_variants(kwargs, match):
    with pytest.raises(moreft.ConfigError, match=match):
        MoReConfig(**kwargs)


def test_default_config_is_the_paper_adapter_and_round_trips():
    assert MoReConfig().is_default_variant
    config = MoReConfig(alpha=2, learnable_scale=True, scale_init=1, composition="multiplicative")
    assert not config.is_default_variant and config.composition is Composition.MULTIPLICATIVE
    assert moreft.config_from_dict(config.to_dict()) == config
    old = {
        k: v
        for k, v in MoReConfig().to_dict().items()  # a file saved before the variants existed
        if k not in ("composition", "alpha", "learnable_scale", "scale_init", "init_mode")
    }
    assert moreft.config_from_dict(old) == MoReConfig()


def test_default_layer_has_no_new_tensors():
    layer = MoReLinear(nn.Linear(20, 36), MoReConfig(), name="lin")
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "more_blkdiag1.default",
        "more_blkdiag2.default",
    }
    assert set(layer.adapter_state()) == {"blkdiag1", "blkdiag2"}


# -- each formula ----------------------------------------------------------------------------------
def _layer(config: MoReConfig, in_f=20, out_f=36, dtype=torch.float64, seed=0) -> MoReLinear:
    torch.manual_seed(seed)
    return MoReLinear(nn.Linear(in_f, out_f, dtype=dtype), config, name="lin")


@pytest.mark.parametrize(
    "config",
    [
        MoReConfig(alpha=2.5),
        MoReConfig(learnable_scale=True),
        MoReConfig(alpha=0.5, learnable_scale=True, scale_init=3),
        MoReConfig(composition="multiplicative"),
        MoReConfig(composition="multiplicative", alpha=2, learnable_scale=True),
        MoReConfig(init_mode="principal"),
        MoReConfig(init_mode="principal", alpha=2, learnable_scale=True, scale_init=0.5),
    ],
    ids=["alpha", "scale", "scale-alpha", "mult", "mult-scale", "principal", "principal-scale"],
)
def test_delta_weight_is_the_stated_formula(config):
    layer = _layer(config)
    randomize_adapters(layer, std=0.5)
    w = layer.base_layer.weight.detach()
    c = config.alpha * (float(layer.more_scale["default"]) if config.learnable_scale else 1.0)
    if config.composition is Composition.MULTIPLICATIVE:
        m = more_delta_weight(layer.blkdiag1, layer.blkdiag2, 36, 36)  # (out, out)
        expected = c * m @ w
    else:
        expected = c * more_delta_weight(layer.blkdiag1, layer.blkdiag2, 20, 36)
    if config.init_mode is InitMode.PRINCIPAL:
        c0 = config.alpha * (config.scale_init if config.learnable_scale else 1.0)
        expected = expected - c0 * more_delta_weight(
            layer.more_init_blkdiag1["default"], layer.more_init_blkdiag2["default"], 20, 36
        )
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-10, atol=1e-12)
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(layer.adapter_forward(x), more_literal(layer, x), rtol=1e-10, atol=1e-12)


def test_learnable_scale_starts_at_zero_with_both_factors_random_as_the_authors():
    layer = _layer(MoReConfig(learnable_scale=True), dtype=torch.float32)
    assert float(layer.more_scale["default"]) == 0.0 and layer.blkdiag2.abs().min() > 0
    x = torch.randn(4, 20)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.base_layer.requires_grad_(False)
    layer(x).square().sum().backward()
    assert layer.more_scale["default"].grad.abs().item() > 0  # only the scale moves at step 0
    assert not layer.blkdiag1.grad.any() and not layer.blkdiag2.grad.any()
    started = _layer(MoReConfig(learnable_scale=True, scale_init=1.0), dtype=torch.float32)
    assert float(started.more_scale["default"]) == 1.0 and not started.blkdiag2.any()  # the LoRA-style zero


def test_alpha_scales_the_default_delta():
    plain, scaled = _layer(MoReConfig()), _layer(MoReConfig(alpha=3.0))
    randomize_adapters(plain)
    scaled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(scaled.delta_weight(), 3.0 * plain.delta_weight(), rtol=1e-12, atol=1e-14)


# -- multiplicative: ΔW depends on W ------------------------------------------------------------------
def test_multiplicative_merge_keeps_the_pre_merge_weight():
    layer = _layer(MoReConfig(composition="multiplicative"))
    randomize_adapters(layer)
    w0 = layer.base_layer.weight.detach().clone()
    m = more_delta_weight(layer.blkdiag1, layer.blkdiag2, 36, 36).detach()
    layer.merge()
    torch.testing.assert_close(
        layer.base_layer.weight, (torch.eye(36, dtype=w0.dtype) + m) @ w0, rtol=1e-12, atol=1e-12
    )  # W' = (I + M)·W
    torch.testing.assert_close(layer.delta_weight(), m @ w0, rtol=1e-12, atol=1e-12)  # not M·W'
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-12, atol=1e-12)
    layer.merged = True  # marked merged without merge(): the pre-merge W is unknown
    with pytest.raises(moreft.MergeError, match="was not merged by merge"):
        layer.delta_weight()


def test_multiplicative_adapters_merged_one_at_a_time_use_the_base_weight():
    layer = _layer(MoReConfig(composition="multiplicative"))
    layer.update_layer("other", MoReConfig(composition="multiplicative", block_rank=1))
    for name in ("default", "other"):
        for p in layer.adapter_params(name).values():
            nn.init.normal_(p, std=0.3)
    layer.set_adapter(["default", "other"])
    x = torch.randn(3, 20, dtype=torch.float64)
    both, w0 = layer(x), layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["default"])
    torch.testing.assert_close(
        layer.delta_weight("other"), more_delta_weight(*layer.adapter_params("other").values(), 36, 36) @ w0
    )
    layer.merge(adapter_names=["other"])
    torch.testing.assert_close(layer.base_layer(x), both, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-12, atol=1e-12)


def test_remora_cycle_chains_multiplicative_factors():
    net = nn.Sequential(nn.Linear(20, 36, dtype=torch.float64))
    moreft.inject(net, MoReConfig(target_modules=["0"], composition="multiplicative"))
    layer = net[0]
    randomize_adapters(layer)
    w0 = layer.base_layer.weight.detach().clone()
    m = more_delta_weight(layer.blkdiag1, layer.blkdiag2, 36, 36).detach()
    merge_and_reinit(net)
    assert not layer.merged and not layer.delta_weight().any()
    torch.testing.assert_close(layer.base_layer.weight, (torch.eye(36, dtype=w0.dtype) + m) @ w0)


# -- principal init ------------------------------------------------------------------------------------
def test_principal_init_holds_the_projection_and_leaves_the_model_unchanged():
    config = MoReConfig(init_mode="principal", nblocks=4, block_rank=2)
    for dtype in (torch.float32, torch.bfloat16):
        layer = _layer(config, dtype=dtype)
        w = layer.base_layer.weight.detach().clone()
        p1, _ = monarch_project(w, 4, 2)
        torch.testing.assert_close(layer.blkdiag1, p1.float())
        torch.testing.assert_close(layer.more_init_blkdiag1["default"], p1.float())
        x = torch.randn(6, 20, dtype=dtype)
        assert torch.equal(layer(x), layer.base_layer(x)) and not layer.delta_weight().any()
        assert torch.equal(layer.base_layer.weight, w)  # the base weight is never rewritten
        principal = more_delta_weight(layer.blkdiag1, layer.blkdiag2, 20, 36)
        assert float(torch.linalg.matrix_norm(principal)) > 0.3 * float(torch.linalg.matrix_norm(w.float()))


def test_principal_adapter_saved_and_loaded_onto_a_fresh_base(tmp_path):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 36), nn.Tanh(), nn.Linear(36, 3))

    model = moreft.inject(net(), MoReConfig(target_modules=["0"], init_mode="principal"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 20)
    for _ in range(3):  # a few real steps: blkdiag1/2 move away from the frozen copy
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    layer = model[0]
    assert not torch.equal(layer.blkdiag2, layer.more_init_blkdiag2["default"])
    moreft.save_adapter(model, tmp_path / "a")
    fresh = net()
    moreft.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh[0].more_init_blkdiag1["default"], layer.more_init_blkdiag1["default"])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        merged = moreft.merge(fresh)
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-6)
