"""The math kernels: MoRe's fast path against the literal Appendix G pseudocode, MoRA's closed-form
ΔW against its literal operators, loop-built oracles for both, and fp64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import cases, expected_r_hat
from conftest import assert_close, make_layer, randomize_adapters

from moreft import Composition, Method, MoRAOperator, SharingLayout
from moreft.ops import blocks as blocks_ops
from moreft.ops import ceil_div, monarch, mora_fused
from moreft.ops import fused as fused_ops
from moreft.ops.monarch import (
    block_shapes,
    block_sizes,
    fold_factors,
    more_delta_weight,
    more_forward,
    more_reference,
)
from moreft.ops.mora import mora_delta_weight, mora_reference, rotation_tables

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
BATCHES = [pytest.param((2, 3), id="batch2x3"), pytest.param((), id="1d")]


def more_factors(case, dtype, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, r = case.config.nblocks, case.config.block_rank
    in_blk, out_blk = block_sizes(case.in_features, case.out_features, n)
    b1 = torch.randn(n, r, in_blk, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    b2 = torch.randn(n, out_blk, r, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return b1, b2


def mora_matrix(dtype, r_hat):
    return torch.randn(r_hat, r_hat, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", cases(Method.MORE))
def test_more_fast_path_equals_reference_outputs_and_grads(case, dtype, batch):
    n_in, n_out = case.in_features, case.out_features
    x = torch.randn(*batch, n_in, generator=torch.Generator().manual_seed(1), dtype=dtype)
    upstream = torch.randn(*batch, n_out, generator=torch.Generator().manual_seed(2), dtype=dtype)
    results = []
    for fn in (more_forward, more_reference):
        xg = x.clone().requires_grad_(True)
        b1, b2 = more_factors(case, dtype, requires_grad=True)
        out = fn(xg, b1, b2, n_out)
        (out * upstream).sum().backward()
        results.append((out, xg.grad, b1.grad, b2.grad))
    (fast, *fast_grads), (ref, *ref_grads) = results
    assert fast.shape == (*batch, n_out)
    assert_close(fast, ref, case.tol)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert got.shape == want.shape
        assert_close(got, want, case.tol)


@pytest.mark.parametrize("case", cases(Method.MORE))
def test_more_delta_weight_equals_loop_oracle_and_identity_forward(case):
    """ΔW[p*N+b] = Σ_a blkdiag2[b,p,a] · A[a*N+b] with A = blkdiag(blkdiag1): the stride permutation."""
    n_in, n_out, n, r = case.in_features, case.out_features, case.config.nblocks, case.config.block_rank
    b1, b2 = more_factors(case, torch.float64)
    in_blk, out_blk = block_sizes(n_in, n_out, n)
    a = torch.zeros(n * r, n * in_blk, dtype=torch.float64)
    for k in range(n):
        a[k * r : (k + 1) * r, k * in_blk : (k + 1) * in_blk] = b1[k]
    oracle = torch.zeros(n * out_blk, n * in_blk, dtype=torch.float64)
    for b in range(n):
        for p in range(out_blk):
            for j in range(r):
                oracle[p * n + b] += b2[b, p, j] * a[j * n + b]
    oracle = oracle[:n_out, :n_in]
    delta = more_delta_weight(b1, b2, n_in, n_out)
    assert delta.shape == (n_out, n_in)
    assert_close(delta, oracle, case.tol)
    identity = more_reference(torch.eye(n_in, dtype=torch.float64), b1, b2, n_out).T
    assert_close(delta, identity, case.tol)
    fa, fb = fold_factors(b1, b2, n_in, n_out)
    assert fa.shape == (n * r, n_in) and fb.shape == (n_out, n * r)


def test_block_and_chunk_counts_are_exact_integer_ceilings():
    """One helper, ops.ceil_div, for every ceil(in / N) and ceil(in / r): integer maths, no float rounding."""
    big = 2**55 + 1  # through a float, big / 2 rounds to 2**54 exactly; the true ceiling is 2**54 + 1
    assert math.ceil(big / 2) == 2**54 and ceil_div(big, 2) == 2**54 + 1
    assert block_sizes(big, big, 2) == (2**54 + 1, 2**54 + 1)
    assert block_shapes(big, 4, 2) == (2, 2**54 + 1, 2)
    assert [ceil_div(n, 4) for n in range(9)] == [0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_more_block_sizes_round_up():
    assert block_sizes(24, 24, 4) == (6, 6)
    assert block_sizes(23, 37, 3) == (8, 13)
    assert block_sizes(20, 36, 1) == (20, 36)


def test_more_nblocks_1_is_plain_low_rank_product():
    gen = torch.Generator().manual_seed(0)
    b1 = torch.randn(1, 3, 7, generator=gen, dtype=torch.float64)
    b2 = torch.randn(1, 5, 3, generator=gen, dtype=torch.float64)
    assert_close(more_delta_weight(b1, b2, 7, 5), b2[0] @ b1[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", cases(Method.MORA))
def test_mora_reference_equals_x_times_delta_weight(case, dtype, batch):
    cfg, n_in, n_out = case.config, case.in_features, case.out_features
    matrix = mora_matrix(dtype, expected_r_hat(case))
    x = torch.randn(*batch, n_in, generator=torch.Generator().manual_seed(1), dtype=dtype)
    delta = mora_delta_weight(matrix, n_in, n_out, cfg.operator, cfg.sharing_layout)
    assert delta.shape == (n_out, n_in)
    out = mora_reference(x, matrix, n_in, n_out, cfg.operator, cfg.sharing_layout)
    assert out.shape == (*batch, n_out)
    assert_close(out, x @ delta.T, case.tol)


# -- MoRA operators against the paper's definitions, built by loops on tiny shapes -------------
def _rotation_matrix(i: int, r: int) -> torch.Tensor:
    """R_i of Eq. 10-11 in rotate-half order: pairs (j, j + r/2) rotated by i·θ_j."""
    rot = torch.zeros(r, r, dtype=torch.float64)
    for j in range(r // 2):
        angle = i * 10000 ** (-2 * j / r)
        c, s = math.cos(angle), math.sin(angle)
        rot[j, j], rot[j, j + r // 2] = c, -s
        rot[j + r // 2, j], rot[j + r // 2, j + r // 2] = s, c
    return rot


def _mora_oracle(m, n_in, n_out, operator, layout):
    r = m.shape[0]
    delta = torch.zeros(n_out, n_in, dtype=torch.float64)
    if operator is MoRAOperator.TRUNCATION:
        delta[:r, :r] = m
    elif operator is MoRAOperator.SHARING:

        def adjacent(width):  # first width % r groups have one more member
            sizes = [width // r + (g < width % r) for g in range(r)]
            return [g for g, size in enumerate(sizes) for _ in range(size)]

        if layout is SharingLayout.STRIDED:
            in_group = {t % n_in: [] for t in range(n_in)}
            for t in range(math.ceil(n_in / r) * r):  # cyclic pad: padded t reads x[t % in]
                in_group[t % n_in].append(t % r)
            out_group = [o % r for o in range(n_out)]
        else:
            in_group = {t: [g] for t, g in enumerate(adjacent(n_in))}
            out_group = adjacent(n_out)
        for o in range(n_out):
            for t, groups in in_group.items():
                delta[o, t] = sum(m[out_group[o], g] for g in groups)
    else:
        c = math.ceil(n_in / r)
        for o in range(n_out):
            flat = o % (c * r)
            i, row = divmod(flat, r)
            block = m @ _rotation_matrix(i, r) if operator is MoRAOperator.ROTATION else m
            for j in range(r):
                delta[o, (i * r + j) % n_in] += block[row, j]
    return delta


# (operator, layout): the layout only matters for SHARING
MORA_OPS = [
    (MoRAOperator.TRUNCATION, SharingLayout.STRIDED),
    (MoRAOperator.SHARING, SharingLayout.STRIDED),
    (MoRAOperator.SHARING, SharingLayout.ADJACENT),
    (MoRAOperator.DECOUPLE, SharingLayout.STRIDED),
    (MoRAOperator.ROTATION, SharingLayout.STRIDED),
]
MORA_OP_IDS = ["truncation", "sharing-strided", "sharing-adjacent", "decouple", "rotation"]


def _valid(n_in, n_out, r, operator):
    if operator in (MoRAOperator.TRUNCATION, MoRAOperator.SHARING) and r > min(n_in, n_out):
        return False
    return operator is not MoRAOperator.ROTATION or r % 2 == 0


MORA_SMALL = [(8, 8, 4), (7, 11, 3), (7, 11, 4), (11, 7, 4), (10, 5, 4), (5, 9, 2), (4, 13, 6)]
PAPER_CASES = [
    pytest.param(n_in, n_out, r, op, lay, id=f"{op_id}-in{n_in}-out{n_out}-r{r}")
    for n_in, n_out, r in MORA_SMALL
    for (op, lay), op_id in zip(MORA_OPS, MORA_OP_IDS, strict=True)
    if _valid(n_in, n_out, r, op)
]


@pytest.mark.parametrize("n_in,n_out,r,operator,layout", PAPER_CASES)
def test_mora_delta_weight_equals_paper_oracle(n_in, n_out, r, operator, layout):
    m = torch.randn(r, r, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = mora_delta_weight(m, n_in, n_out, operator, layout)
    torch.testing.assert_close(got, _mora_oracle(m, n_in, n_out, operator, layout), rtol=1e-12, atol=1e-12)


def test_rotation_tables_match_eq11():
    cos, sin = rotation_tables(3, 4, torch.device("cpu"), torch.float64)
    theta = torch.tensor([1.0, 10000**-0.5], dtype=torch.float64)
    angles = torch.arange(3, dtype=torch.float64)[:, None] * torch.cat([theta, theta])
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())


# -- gradcheck (fp64, small shapes) --------------------------------------------------------------
@pytest.mark.parametrize(
    "n_in,n_out,n,r", [(6, 6, 2, 2), (7, 5, 3, 1), (5, 9, 1, 2), (9, 4, 2, 2)], ids=lambda v: str(v)
)
def test_more_forward_gradcheck(n_in, n_out, n, r):
    gen = torch.Generator().manual_seed(0)
    in_blk, out_blk = block_sizes(n_in, n_out, n)
    x = torch.randn(2, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(n, r, in_blk, generator=gen, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(n, out_blk, r, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: more_forward(*a, n_out), (x, b1, b2))
    assert torch.autograd.gradcheck(lambda *a: more_reference(*a, n_out), (x, b1, b2))


@pytest.mark.parametrize("operator,layout", MORA_OPS, ids=MORA_OP_IDS)
def test_mora_reference_gradcheck(operator, layout):
    n_in, n_out, r = 7, 9, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.randn(r, r, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: mora_reference(x, m, n_in, n_out, operator, layout), (x, m))
    assert torch.autograd.gradcheck(lambda m: mora_delta_weight(m, n_in, n_out, operator, layout), (m,))


# -- one copy of each fold / block rule, shared by the reference path, the fused layer and merging ------
@pytest.mark.parametrize("case", cases(Method.MORE))
def test_fold_equals_its_reference_and_the_grads_are_its_adjoints(case):
    layer = make_layer(case, dtype=torch.float64)
    randomize_adapters(layer)
    b1, b2 = layer.blkdiag1.detach().requires_grad_(), layer.blkdiag2.detach().requires_grad_()
    multiplicative = layer.adapter_configs["default"].composition is Composition.MULTIPLICATIVE
    width = case.out_features if multiplicative else case.in_features  # M is (out, out) for M·W
    a, b = fold_factors(b1, b2, width, case.out_features)
    a_ref, b_ref = monarch.fold_factors_reference(b1, b2, width, case.out_features)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
    gen = torch.Generator().manual_seed(5)
    ga, gb = (
        torch.randn(a.shape, generator=gen, dtype=a.dtype),
        torch.randn(b.shape, generator=gen, dtype=b.dtype),
    )
    da, db = torch.autograd.grad((a * ga).sum() + (b * gb).sum(), (b1, b2))
    ga_pad = F.pad(ga, (0, b1.shape[0] * b1.shape[2] - width))  # (N·r, N·I)
    gb_pad = F.pad(gb.T, (0, b2.shape[0] * b2.shape[1] - case.out_features))  # (N·r, N·O)
    assert torch.equal(monarch.more_a_grad(ga_pad, b1), da) and torch.equal(
        monarch.more_b_grad(gb_pad, b2), db
    )


def test_more_is_folded_by_one_op_everywhere():
    """The fused Function, the layer's merge and the reference path share monarch's fold (no second copy)."""
    from moreft.layers import more as more_layer

    for name in ("fold_more_a", "fold_more_b", "more_a_grad", "more_b_grad"):
        assert getattr(fused_ops, name) is getattr(monarch, name), name
    assert more_layer.fold_more_a is monarch.fold_more_a and more_layer.fold_more_b is monarch.fold_more_b


@pytest.mark.parametrize("case", cases(Method.MORA))
def test_mora_blocks_are_one_op_for_the_dense_delta_and_the_fused_layer(case):
    """ops.mora.mora_blocks is the only block rule: the closed-form ΔW and the in-place merge place the same blocks."""
    from moreft.ops import mora as mora_ops

    assert mora_fused.mora_blocks is mora_ops.mora_blocks
    layer = make_layer(case, dtype=torch.float64)
    randomize_adapters(layer)
    matrix, operator = layer.matrix.detach(), case.config.operator
    blocks = mora_ops.mora_blocks(matrix, case.in_features, operator)
    if operator is MoRAOperator.SHARING:
        assert blocks is None
        return
    cached = mora_ops.mora_blocks(matrix, case.in_features, operator, mora_fused.cached_rotation_tables)
    assert torch.equal(blocks, cached)
    spans = mora_fused.mora_spans(case.in_features, case.out_features, layer.r_hat, operator)
    placed = blocks_ops.add_blocks_(matrix.new_zeros(case.out_features, case.in_features), blocks, spans, 1.0)
    assert torch.equal(placed, layer.delta_weight().detach())
