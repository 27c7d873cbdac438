"""MoRA SHARING's fused path (moreft.ops.sharing) against the literal operator (moreft.ops.mora).

The layer-level equality over the shared case table is in test_fused.py; here the op itself:
gradcheck in fp64, the segment layout against ``input_groups`` / ``output_groups``, and the in-place
ΔW against the closed form, on square, rectangular and non-divisible widths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moreft import MoRAOperator, SharingLayout
from moreft.ops import sharing
from moreft.ops.mora import input_groups, mora_delta_weight, mora_reference, output_groups
from moreft.ops.mora_fused import mora_delta_add_, mora_linear

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(8, 8, 4), (9, 9, 4), (6, 14, 4), (14, 6, 4), (10, 7, 7), (23, 37, 6), (37, 23, 5), (12, 12, 12)]
LAYOUTS = [SharingLayout.STRIDED, SharingLayout.ADJACENT]


def group_matrix(segs, width: int, r: int) -> torch.Tensor:
    """``(r, width)`` counts: how often wide column ``t`` feeds group ``j``, from the segments."""
    counts = torch.zeros(r, width, dtype=torch.float64)
    for s in segs:
        for i in range(s.count):
            for u in range(s.width):
                counts[s.group + (i if s.repeat else u), s.pos + i * s.width + u] += 1
    return counts


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: v.value)
@pytest.mark.parametrize("in_f,out_f,r", SHAPES)
def test_segments_are_the_reference_groups(in_f, out_f, r, layout):
    group, source = input_groups(in_f, r, layout, torch.device("cpu"))
    expected_in = torch.zeros(r, in_f, dtype=torch.float64).index_put_(
        (group, source), torch.ones(len(group), dtype=torch.float64), accumulate=True
    )
    assert torch.equal(group_matrix(sharing.segments(in_f, r, layout, True), in_f, r), expected_in)
    out_group = output_groups(out_f, r, layout, torch.device("cpu"))
    expected_out = F.one_hot(out_group, r).T.double()  # (r, out)
    assert torch.equal(group_matrix(sharing.segments(out_f, r, layout, False), out_f, r), expected_out)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: v.value)
@pytest.mark.parametrize("in_f,out_f,r", SHAPES)
def test_gradcheck_and_reference(in_f, out_f, r, layout):
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    for tokens in (3, 2 * in_f):
        x, w, m = t(tokens, in_f), t(out_f, in_f), t(r, r)
        for bias in (t(out_f), None):
            assert torch.autograd.gradcheck(
                lambda *args: sharing.sharing_linear(*args, layout), (x, w, bias, m), fast_mode=True
            )
        y = sharing.sharing_linear(x, w, None, m, layout)
        ref = F.linear(x, w) + mora_reference(x, m, in_f, out_f, MoRAOperator.SHARING, layout)
        g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        got_grads = torch.autograd.grad(y, (x, w, m), g)
        ref_grads = torch.autograd.grad(ref, (x, w, m), g)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(got_grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("operator", list(MoRAOperator), ids=lambda v: v.value)
@pytest.mark.parametrize("in_f,out_f,r", [(23, 37, 6), (37, 23, 6), (24, 24, 8)])
def test_in_place_delta_equals_closed_form(in_f, out_f, r, operator):
    m = torch.randn(r, r, dtype=torch.float64)
    for layout in LAYOUTS:
        w = torch.randn(in_f, out_f, dtype=torch.float64).T  # a transposed view, as a Conv1D weight
        expected = w + 0.5 * mora_delta_weight(m, in_f, out_f, operator, layout)
        ptr = w.data_ptr()
        mora_delta_add_(w, m, operator, layout, alpha=0.5)
        assert w.data_ptr() == ptr
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-13)


def test_mora_linear_without_grad_keeps_no_graph():
    m = torch.randn(4, 4, requires_grad=True)
    x, w = torch.randn(5, 9), torch.randn(7, 9)
    with torch.no_grad():
        y = mora_linear(x, w, None, m, MoRAOperator.SHARING, SharingLayout.ADJACENT)
    assert y.grad_fn is None and y.shape == (5, 7)
    expected = F.linear(x, w) + mora_reference(
        x, m.detach(), 9, 7, MoRAOperator.SHARING, SharingLayout.ADJACENT
    )
    torch.testing.assert_close(y, expected)


MIXED = [(SharingLayout.STRIDED, SharingLayout.ADJACENT), (SharingLayout.ADJACENT, SharingLayout.STRIDED)]


@pytest.mark.parametrize(
    "layout,output_layout", MIXED, ids=["strided-in-adjacent-out", "adjacent-in-strided-out"]
)
@pytest.mark.parametrize("in_f,out_f,r", [(9, 9, 4), (23, 37, 6), (37, 23, 5)])
def test_mixed_layouts_fused_equal_reference(in_f, out_f, r, layout, output_layout):
    """The authors' mora_type 3/4 (one grouping for inputs, the other for outputs): forward, grads, merge."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * in_f, in_f, dtype=torch.float64, generator=gen).requires_grad_(True)
    w = torch.randn(out_f, in_f, dtype=torch.float64, generator=gen).requires_grad_(True)
    m = torch.randn(r, r, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = mora_linear(x, w, None, m, MoRAOperator.SHARING, layout, output_layout)
    ref = F.linear(x, w) + mora_reference(x, m, in_f, out_f, MoRAOperator.SHARING, layout, output_layout)
    same = F.linear(x, w) + mora_reference(x, m, in_f, out_f, MoRAOperator.SHARING, layout)
    assert not torch.allclose(ref, same)  # the mixed grouping is a different operator
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(
        torch.autograd.grad(y, (x, w, m), g), torch.autograd.grad(ref, (x, w, m), g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    merged = mora_delta_add_(w.detach().clone(), m.detach(), MoRAOperator.SHARING, layout, 1.0, output_layout)
    closed = w.detach() + mora_delta_weight(
        m.detach(), in_f, out_f, MoRAOperator.SHARING, layout, output_layout
    )
    torch.testing.assert_close(merged, closed, rtol=0, atol=1e-13)
