"""moreft with the interop options against our transcriptions of the authors' code (tests/official).

fp64, tight: outputs, ΔW and the gradients of both inputs and adapter parameters, on square,
rectangular and non-divisible shapes, for every official MoRA ``mora_type`` and both official
MoRe block rules. Default options are checked to be unchanged elsewhere (tests/cases.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close
from official import kongds_mora, sprocketlab_more
from torch import nn

from moreft import MoRAConfig, MoReConfig
from moreft.config import BlockRule, MoRAOperator, RHatRounding, SharingLayout
from moreft.errors import ConfigError
from moreft.layers import MoRALinear, MoReLinear
from moreft.ops.monarch import block_shapes
from moreft.ops.mora import square_size

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL, ATOL = 1e-12, 1e-13
S, A = SharingLayout.STRIDED, SharingLayout.ADJACENT
#: mora_type -> (operator, input grouping, output grouping), as interop/kongds_mora.py maps them.
TYPES = {
    1: (MoRAOperator.SHARING, S, S),
    2: (MoRAOperator.SHARING, A, A),
    3: (MoRAOperator.SHARING, A, S),
    4: (MoRAOperator.SHARING, S, A),
    6: (MoRAOperator.ROTATION, S, S),
}
SHAPES = ((24, 24), (20, 36), (36, 20), (23, 37), (48, 80), (37, 13))
RANKS = (1, 2, 4)


def _runs_officially(in_f: int, out_f: int, rank: int, mora_type: int) -> bool:
    """Combinations the official code itself can run: its cyclic pad needs ``r - in % r <= in``;
    type 6 needs an even r̂ (odd ones break its rotate-half)."""
    r = kongds_mora.r_hat(in_f, out_f, rank)
    pad_ok = in_f % r == 0 or r - in_f % r <= in_f
    return pad_ok and not (mora_type == 6 and r % 2)


MORA_CASES = [
    pytest.param(i, o, k, t, id=f"type{t}-in{i}-out{o}-r{k}")
    for t in TYPES
    for i, o in SHAPES
    for k in RANKS
    if _runs_officially(i, o, k, t)
]


def official_mora_layer(in_f: int, out_f: int, rank: int, mora_type: int) -> MoRALinear:
    operator, layout_in, layout_out = TYPES[mora_type]
    config = MoRAConfig(
        target_modules=("lin",),
        rank=rank,
        operator=operator,
        sharing_layout=layout_in,
        sharing_output_layout=layout_out,
        r_hat_rounding="round",
        cap_r_hat=False,
    )
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(in_f, out_f, dtype=torch.float64), config, name="lin")
    with torch.no_grad():
        layer.matrix.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize(("in_f", "out_f", "rank", "mora_type"), MORA_CASES)
def test_mora_matches_official_forward_delta_and_grads(in_f, out_f, rank, mora_type):
    layer = official_mora_layer(in_f, out_f, rank, mora_type)
    assert layer.r_hat == kongds_mora.r_hat(in_f, out_f, rank)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    m_ref = layer.matrix.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, out_f, dtype=torch.float64)

    y = layer(x) - layer.base_layer(x)  # the full layer: fused path where one exists
    y_ref = kongds_mora.apply_mora(x_ref, m_ref, in_f, out_f, mora_type, table_dtype=torch.float64)
    assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)
    assert_close(layer.matrix.grad, m_ref.grad, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        assert_close(
            layer.delta_weight(),
            kongds_mora.apply_mora(
                torch.eye(in_f, dtype=torch.float64), m_ref, in_f, out_f, mora_type, torch.float64
            ).T,
            rtol=RTOL,
            atol=ATOL,
        )
        if mora_type != 6 or layer.r_hat < in_f:  # their type-6 merge has no last block when r̂ >= in
            assert_close(
                layer.delta_weight(),
                kongds_mora.delta_weight(m_ref, in_f, out_f, mora_type, torch.float64),
                rtol=RTOL,
                atol=ATOL,
            )


def test_official_rotation_tables_in_float32_differ_only_by_rounding():
    """Their type-6 cos/sin are built in float32; in a float32 run both sides agree to float32 rounding."""
    layer = official_mora_layer(24, 40, 2, 6).float()
    x = torch.randn(4, 24)
    ref = kongds_mora.apply_mora(x, layer.matrix.detach(), 24, 40, 6)
    assert_close(layer.adapter_forward(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("in_f", "out_f", "rank", "expected"),
    [(64, 64, 4, 23), (4096, 11008, 8, 348), (48, 80, 32, 64), (4096, 4096, 8, 256), (23, 37, 2, 11)],
)
def test_square_size_round_is_the_official_expression(in_f, out_f, rank, expected):
    assert (
        square_size(in_f, out_f, rank, RHatRounding.ROUND) == kongds_mora.r_hat(in_f, out_f, rank) == expected
    )
    assert square_size(in_f, out_f, rank) == math.isqrt((in_f + out_f) * rank)  # default unchanged


def test_square_size_round_agrees_with_official_everywhere_small():
    for in_f in range(1, 90, 7):
        for out_f in range(1, 200, 13):
            for rank in (1, 2, 3, 8, 16, 64):
                assert square_size(in_f, out_f, rank, RHatRounding.ROUND) == kongds_mora.r_hat(
                    in_f, out_f, rank
                )


def test_uncapped_sharing_is_refused_by_default_and_allowed_with_the_option():
    base = nn.Linear(48, 80)
    capped = MoRALinear(base, MoRAConfig(rank=32, operator="sharing", r_hat_rounding="round"))
    assert capped.r_hat == 48
    assert (
        MoRALinear(
            nn.Linear(48, 80),
            MoRAConfig(rank=32, operator="sharing", r_hat_rounding="round", cap_r_hat=False),
        ).r_hat
        == 64
    )
    with pytest.raises(ConfigError, match=r"r_hat=64 must be <= min\(in_features, out_features\)=48"):
        MoRALinear(nn.Linear(48, 80), MoRAConfig(r_hat=64, operator="sharing"))
    with pytest.raises(ConfigError, match="r_hat=64 must be <= min"):  # truncation keeps its cap
        MoRALinear(nn.Linear(48, 80), MoRAConfig(r_hat=64, operator="truncation", cap_r_hat=False))


# -- MoRe ------------------------------------------------------------------------------------------
MORE_SHAPES = ((24, 24), (20, 36), (36, 20), (23, 37), (20, 12), (11, 50))
MORE_CASES = [
    pytest.param(i, o, n, r, rule, id=f"{rule.value}-in{i}-out{o}-N{n}-r{r}")
    for rule in (BlockRule.OFFICIAL, BlockRule.OFFICIAL_INT)
    for i, o in MORE_SHAPES
    for n in (3, 4, 8)
    for r in (1, 2, 5)
    if n <= i
]


@pytest.mark.parametrize(("in_f", "out_f", "nblocks", "block_rank", "rule"), MORE_CASES)
def test_more_matches_official_shapes_forward_delta_and_grads(in_f, out_f, nblocks, block_rank, rule):
    official = sprocketlab_more.block_shapes(in_f, out_f, nblocks, float_align=rule is BlockRule.OFFICIAL)
    assert block_shapes(in_f, out_f, nblocks, rule) == official
    torch.manual_seed(0)
    layer = MoReLinear(
        nn.Linear(in_f, out_f, dtype=torch.float64),
        MoReConfig(nblocks=nblocks, block_rank=block_rank, block_rule=rule),
        name="lin",
    )
    n, in_blk, out_blk = official
    assert layer.blkdiag1.shape == (n, block_rank, in_blk) and layer.blkdiag2.shape == (
        n,
        out_blk,
        block_rank,
    )
    with torch.no_grad():
        layer.blkdiag2.normal_(0, 0.3)
    b1 = layer.blkdiag1.detach().clone().requires_grad_(True)
    b2 = layer.blkdiag2.detach().clone().requires_grad_(True)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 3, out_f, dtype=torch.float64)
    y = layer(x) - layer.base_layer(x)
    y_ref = sprocketlab_more.adapter_output(x_ref, b1, b2, out_f)
    assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for ours, theirs in (
        (x.grad, x_ref.grad),
        (layer.blkdiag1.grad, b1.grad),
        (layer.blkdiag2.grad, b2.grad),
    ):
        assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        assert_close(
            layer.delta_weight(), sprocketlab_more.merged_delta(b1, b2, in_f, out_f), rtol=RTOL, atol=ATOL
        )
        merged = layer.base_layer.weight + layer.delta_weight()
        layer.merge(safe=True)
        assert_close(layer.base_layer.weight, merged, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("in_f", "out_f", "nblocks", "rule", "expected"),
    [
        (11008, 14336, 4, BlockRule.OFFICIAL, (4, 2752, 3585)),
        (11008, 14336, 4, BlockRule.MOREFT, (4, 2752, 3584)),
        (20, 36, 8, BlockRule.OFFICIAL, (7, 3, 6)),
        (20, 36, 8, BlockRule.MOREFT, (8, 3, 5)),
        (4096, 11008, 4, BlockRule.OFFICIAL_INT, (4, 1024, 3072)),
    ],
)
def test_block_shapes_of_the_issue(in_f, out_f, nblocks, rule, expected):
    assert block_shapes(in_f, out_f, nblocks, rule) == expected
    if rule is not BlockRule.MOREFT:
        assert sprocketlab_more.block_shapes(in_f, out_f, nblocks, rule is BlockRule.OFFICIAL) == expected
    layer = MoReLinear(
        nn.Linear(in_f, out_f, device="meta"), MoReConfig(nblocks=nblocks, block_rank=2, block_rule=rule)
    )
    assert tuple(layer.blkdiag2.shape) == (expected[0], expected[2], 2)


def test_official_rule_allows_block_rank_above_block_size_and_default_refuses_it():
    with pytest.raises(ConfigError, match=r"block_rank=5 must be <= min\(in_block, out_block\)=3"):
        MoReLinear(nn.Linear(12, 12), MoReConfig(nblocks=4, block_rank=5))
    layer = MoReLinear(nn.Linear(12, 12), MoReConfig(nblocks=4, block_rank=5, block_rule="official"))
    assert layer.blkdiag1.shape == (4, 5, 3)


def test_export_lora_of_an_official_rule_layer_with_dropped_blocks_is_exact(tmp_path):
    """20 inputs in 8 blocks keep 7 (official rule); the export pads to rank nblocks * block_rank."""
    from conftest import TinyNet, randomize_adapters

    import moreft

    torch.manual_seed(0)
    net = moreft.inject(
        TinyNet(20, 36), MoReConfig(target_modules=("lin",), nblocks=8, block_rank=2, block_rule="official")
    )
    randomize_adapters(net)
    report = moreft.export_lora(net, tmp_path / "lora")
    assert report.rank == 16 and report.max_relative_error == 0.0
    from peft import PeftModel

    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(TinyNet(20, 36), str(tmp_path / "lora"))
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert_close(peft_model(x), net(x), rtol=1e-5, atol=1e-6)
