"""The fused path (moreft.ops.fused, moreft.ops.blocks) equals the literal references, forward and backward.

The references are the paper-literal maths: ``more_reference`` (MoRe Appendix G), ``mora_reference``
(MoRA Eq. 2) and ``x Aᵀ Bᵀ · alpha/r`` (LoRA), each added to ``F.linear(x, W, b)``. Every case of
the shared table runs; a spy proves that the fused Functions really ran where they should.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, cases
from conftest import assert_close, make_layer, more_literal, randomize_adapters
from torch import nn

from moreft import MergeError, Method, MoRAConfig, MoRAOperator
from moreft.layers import AdapterLayer, MoRALinear
from moreft.ops import blocks as blocks_ops
from moreft.ops import fused as fused_ops
from moreft.ops import mora_fused
from moreft.ops import sharing as sharing_ops
from moreft.ops.mora import mora_reference

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def literal(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + x ΔWᵀ`` written from the papers' definitions, with the layer's own tensors."""
    base = layer.base_layer
    weight = base.weight.T if type(base) is not nn.Linear else base.weight  # Conv1D stores (in, out)
    y = F.linear(x, weight, base.bias)
    if layer.method is Method.MORE:
        return y + more_literal(layer, x)  # more_reference, scaled / composed as the config says
    if layer.method is Method.MORA:
        return y + mora_reference(
            x, layer.matrix, layer.in_features, layer.out_features, layer.operator, layer.sharing_layout
        )
    return y + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling


def expect_fused(layer: AdapterLayer) -> bool:
    # every method and every MoRA operator has a fused path; MoRe's Appendix C / E variants do not
    return layer.method is not Method.MORE or layer.config.is_default_variant


class Spy:
    """Counts calls into the fused Functions' forward maths."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for module, name in ((fused_ops, "_forward"), (blocks_ops, "_forward"), (sharing_ops, "_forward")):
            original = getattr(module, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


def run(layer: AdapterLayer, x: torch.Tensor, fn, x_grad: bool = True, seed: int = 5):
    """Output, ``∂x`` and the gradient of every parameter that requires one, for ``fn(layer, x)``."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x_grad)
    y = fn(layer, x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    y.backward(g)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_same(got, ref, tol) -> None:
    assert_close(got[0], ref[0], tol)
    if ref[1] is None:
        assert got[1] is None
    else:
        assert_close(got[1], ref[1], tol)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], tol)


def fused_call(layer, x):
    return layer(x)


@pytest.mark.parametrize("tokens", [7, 77], ids=["thin", "wide"])  # 77 >= 2·in: forward through W + ΔW
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", cases())
def test_fused_equals_literal_reference(case, dtype, tokens, monkeypatch):
    spy = Spy(monkeypatch)
    for conv1d, bias in ((False, True), (True, True), (False, False)):
        layer = make_layer(case, dtype=dtype, conv1d=conv1d)
        if not bias:
            layer.base_layer.bias = None
        randomize_adapters(layer, std=0.5)
        x = torch.randn(tokens // 7, 7, case.in_features, dtype=dtype)  # leading batch dims
        before = spy.calls
        got = run(layer, x, fused_call)
        assert (spy.calls > before) == expect_fused(layer), (conv1d, bias)
        assert_same(got, run(layer, x, literal), case.tol)


@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].in_features == 23])
def test_inputs_without_grad_and_trainable_base(case):
    layer = make_layer(case, dtype=torch.float64)
    randomize_adapters(layer)
    x = torch.randn(5, case.in_features, dtype=torch.float64)
    for x_grad in (False, True):
        assert_same(run(layer, x, fused_call, x_grad), run(layer, x, literal, x_grad), case.tol)
    layer.base_layer.requires_grad_(True)  # the base trains too: exact weight and bias gradients
    for tokens in (5, 60):
        x = torch.randn(tokens, case.in_features, dtype=torch.float64)
        got, ref = run(layer, x, fused_call), run(layer, x, literal)
        assert "base_layer.weight" in ref[2]
        assert_same(got, ref, case.tol)


@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].in_features == 36])
def test_eval_no_grad_and_inference_mode(case, monkeypatch):
    spy = Spy(monkeypatch)
    layer = make_layer(case, dtype=torch.float64)
    layer.dropout = nn.Dropout(0.3)  # configured, but inactive in eval
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(4, 3, case.in_features, dtype=torch.float64)
    ref = literal(layer, x).detach()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert_close(layer(x), ref, case.tol)
    assert spy.calls == (2 if expect_fused(layer) else 0)
    with fused_ops.reference_mode():  # the switch the tests and the bench use
        assert_close(layer(x).detach(), ref, case.tol)
    assert spy.calls == (2 if expect_fused(layer) else 0)


def test_mora_tables_first_built_in_inference_mode_still_train():
    case = next(c for c in CASES if c.method is Method.MORA and c.config.operator is MoRAOperator.ROTATION)
    mora_fused.clear_rotation_tables()
    layer = make_layer(case)
    randomize_adapters(layer)
    x = torch.randn(3, case.in_features)
    with torch.inference_mode():
        expected = layer(x)
    got = layer(x)
    got.sum().backward()
    assert_close(got.detach(), expected, case.tol)
    assert layer.matrix.grad is not None


@pytest.mark.parametrize("case", cases(Method.MORE, Method.LORA) + cases(operators=(MoRAOperator.ROTATION,)))
def test_active_dropout_runs_the_reference_path(case, monkeypatch):
    spy = Spy(monkeypatch)
    layer = make_layer(case, dtype=torch.float64)
    layer.dropout = nn.Dropout(0.5)
    randomize_adapters(layer)
    x = torch.randn(6, case.in_features, dtype=torch.float64)
    torch.manual_seed(3)
    got = run(layer, x, fused_call)
    layer.fused = False
    torch.manual_seed(3)
    ref = run(layer, x, fused_call)
    assert spy.calls == 0
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_empty_batch_and_1d_input():
    for case in (CASES[0], next(c for c in CASES if c.method is Method.MORA)):
        layer = make_layer(case)
        randomize_adapters(layer)
        empty = torch.randn(0, case.in_features, requires_grad=True)
        y = layer(empty)
        assert y.shape == (0, case.out_features)
        y.sum().backward()
        single = torch.randn(case.in_features)
        assert_close(layer(single), literal(layer, single), case.tol)


def test_gradcheck_lowrank_functions():
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    x, w = t(5, 9), t(7, 9)
    for bias in (t(7), None):
        for rank in (4, 17):  # rank >= 16 takes the other layout for g·B
            assert torch.autograd.gradcheck(
                lambda *args: fused_ops.lora_linear(*args, 1.5),
                (x, w, bias, t(rank, 9), t(7, rank)),
                fast_mode=True,
            )
        # MoRe (N, r, I) / (N, O, r) over 9 -> 7: 4 blocks of 3 (the last all padding, outputs cut to 7);
        # 3 blocks of 3 (no input padding: the blocked products); rank 6 in 3 blocks (k = 18)
        for n, r, in_block in ((4, 2, 3), (3, 2, 3), (3, 6, 3)):
            out_block = -(-7 // n)
            assert torch.autograd.gradcheck(
                fused_ops.more_linear, (x, w, bias, t(n, r, in_block), t(n, out_block, r)), fast_mode=True
            )


@pytest.mark.parametrize(
    "in_f,out_f,r", [(8, 8, 4), (9, 9, 4), (6, 14, 4), (14, 6, 4), (4, 10, 6), (8, 12, 4)]
)
def test_gradcheck_blocks_function(in_f, out_f, r):
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    c = -(-in_f // r)
    for tokens in (3, 2 * in_f):
        x, w = t(tokens, in_f), t(out_f, in_f)
        for bias in (t(out_f), None):
            assert torch.autograd.gradcheck(
                lambda *args: blocks_ops.blocks_linear(*args, True), (x, w, bias, t(c, r, r)), fast_mode=True
            )


@pytest.mark.parametrize(
    "in_f,out_f,r",
    [
        (24, 24, 6),
        (23, 37, 6),
        (37, 23, 6),
        (20, 36, 8),
        (8, 64, 10),
        (64, 8, 6),
        (384, 384, 78),
        (1024, 4096, 202),
    ],
)
@pytest.mark.parametrize("operator", [MoRAOperator.DECOUPLE, MoRAOperator.ROTATION])
def test_spans_place_exactly_the_closed_form_delta(in_f, out_f, r, operator):
    mora = MoRALinear(nn.Linear(in_f, out_f, dtype=torch.float64), MoRAConfig(r_hat=r, operator=operator))
    randomize_adapters(mora)
    blocks, spans = mora.block_form()
    placed = blocks_ops.add_blocks_(torch.zeros(out_f, in_f, dtype=torch.float64), blocks.detach(), spans)
    torch.testing.assert_close(placed, mora.delta_weight().detach(), rtol=0, atol=1e-13)
    covered = sum(s.count * (s.row1 - s.row0) * (s.col1 - s.col0) for s in spans)
    assert covered == sum(min(r, out_f - o) for o in range(0, out_f, r)) * r  # every block cell once


def test_hooked_subclassed_or_transformed_base_runs_the_reference(monkeypatch):
    spy = Spy(monkeypatch)
    case = CASES[0]
    layer = make_layer(case)
    randomize_adapters(layer)
    x = torch.randn(2, case.in_features)
    seen = []
    for register in (layer.base_layer.register_forward_hook, layer.base_layer.register_full_backward_hook):
        handle = register(lambda *args: seen.append(1))
        layer(x.requires_grad_(True)).sum().backward()
        handle.remove()
    assert len(seen) == 2 and spy.calls == 0

    class Wrapped(torch.Tensor):  # a tensor subclass weight (as torchao's quantised ones are)
        pass

    plain = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(plain.detach().as_subclass(Wrapped), requires_grad=False)
    layer(x)
    assert spy.calls == 0
    layer.base_layer.weight = plain
    layer(x)
    assert spy.calls == 1
    params = {n: p.detach() for n, p in layer.named_parameters()}  # torch.func: reference path, same values
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    for p in layer.parameters():
        p.grad = None
    literal(layer, x).square().sum().backward()
    for (
        name,
        param,
    ) in layer.adapter_params().items():  # the optional ones (e.g. a learnable scale) if present
        assert_close(grads[f"{layer.prefix}{name}.default"], param.grad, case.tol)
    assert spy.calls == 1


def test_layer_switch_overrides_module_switch(monkeypatch):
    spy = Spy(monkeypatch)
    layer = make_layer(CASES[0])
    x = torch.randn(2, CASES[0].in_features)
    layer.fused = False
    layer(x)
    assert spy.calls == 0
    layer.fused = True
    with fused_ops.reference_mode():
        layer(x)
        assert spy.calls == 1
        layer.fused = None
        layer(x)
        assert spy.calls == 1
    assert fused_ops.fused_enabled()


# -- merging in place ----------------------------------------------------------------------------

MERGE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def no_forward(monkeypatch, layer: AdapterLayer) -> None:
    """Merging must not run the adapter on anything (no identity-matrix forward)."""

    def refuse(*args, **kwargs):
        raise AssertionError("merge ran a forward pass")

    monkeypatch.setattr(layer, "adapter_forward", refuse)
    monkeypatch.setattr(layer, "_fused_forward", refuse)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    ids=["fp64", "fp32", "bf16", "fp16"],
)
@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].in_features in (23, 36)])
def test_merge_in_place_idempotent_reversible(case, dtype, conv1d, monkeypatch):
    layer = make_layer(case, dtype=dtype, conv1d=conv1d)
    randomize_adapters(layer)
    weight = layer.base_layer.weight
    original = weight.detach().clone()
    delta = layer.delta_weight().detach().double()
    expected = (original.double() + (delta.T if conv1d else delta)).to(dtype)  # rounded once
    x = torch.randn(3, case.in_features).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
    no_forward(monkeypatch, layer)
    ptr = weight.data_ptr()
    layer.merge(safe=True)
    layer.merge()  # idempotent
    assert layer.merged and weight.data_ptr() == ptr  # in place
    tol = MERGE_TOL[dtype]
    assert_close(weight.detach().double(), expected.double(), rtol=tol, atol=tol)
    with torch.no_grad():
        assert_close(layer(x).double(), unmerged.double(), rtol=10 * tol, atol=10 * tol)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged and weight.data_ptr() == ptr
    assert_close(weight.detach().double(), original.double(), rtol=tol, atol=2 * tol)


@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].in_features == 24])
def test_safe_merge_refuses_non_finite_and_writes_nothing(case):
    layer = make_layer(case)
    randomize_adapters(layer)
    with torch.no_grad():
        next(iter(layer.adapter_params().values())).view(-1)[0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(
        MergeError,
        match=r"merging adapter layer 'lin' would write \d+ NaN/Inf values into its "
        r"torch.float32 weight; nothing was merged",
    ):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_safe_merge_checks_after_the_cast_to_the_base_dtype():
    case = next(c for c in CASES if c.method is Method.LORA)
    layer = make_layer(case, dtype=torch.float16)
    with torch.no_grad():  # ΔW = 2·r·1e2·1e2 = 8e4 per entry: finite in fp32, inf in fp16 (max 65504)
        layer.lora_A.fill_(1e2)
        layer.lora_B.fill_(1e2)
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match=r"torch\.float16 weight"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before)
