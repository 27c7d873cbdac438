"""Triton MoRe kernels (:mod:`moreft.ops.triton_more`) against the paper's pseudocode.

Three groups, none of which needs a GPU except the last:

* interpreter cases: outputs and all three gradients vs :func:`more_reference` (fp64) on small
  shapes. ``TRITON_INTERPRET=1`` has to be set before Triton is imported, so these run in ONE
  child ``pytest`` process started by :func:`test_interpreter_suite`, with that variable in the
  child's environment only; nothing leaks into this process or into other test modules. Run them
  directly with ``MOREFT_TRITON_CHILD=1 TRITON_INTERPRET=1 pytest tests/test_triton.py``.
* compile checks: every kernel is compiled to an sm_90 (and sm_80) cubin with Triton's bundled
  ``ptxas``, no driver involved, so CI catches kernels that only the interpreter accepts.
* GPU cases at full Llama-7B size (``test_triton_gpu.py``); they skip without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from moreft.ops.monarch import block_sizes, more_reference

_CHILD = os.environ.get("MOREFT_TRITON_CHILD") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0") == "1"

needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(
    not (_HAS_TRITON and torch.cuda.is_available() and not _INTERPRET_ENV),
    reason="needs triton and a CUDA GPU (full-size kernels)",
)


def _factors(n_in: int, n_out: int, nblocks: int, rank: int, dtype, device="cpu", seed=0):
    """Random ``blkdiag1 (N, r, I)``, ``blkdiag2 (N, O, r)`` (blkdiag2 nonzero, unlike at init)."""
    in_blk, out_blk = block_sizes(n_in, n_out, nblocks)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w1 = torch.randn(nblocks, rank, in_blk, generator=gen) / in_blk**0.5
    w2 = torch.randn(nblocks, out_blk, rank, generator=gen) / rank**0.5
    return w1.to(device=device, dtype=dtype), w2.to(device=device, dtype=dtype)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (relative to the tensor's scale, robust to near-zero entries)."""
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _compare(fn, x, w1, w2, n_out, tol, ref_fn=more_reference):
    """fn and ref_fn (in fp64) agree on y and on the gradients of x, blkdiag1 and blkdiag2."""
    x, w1, w2 = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    y = fn(x, w1, w2, n_out)
    assert y.shape == (*x.shape[:-1], n_out) and y.dtype == x.dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, (x, w1, w2), dy)
    refs = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    y_ref = ref_fn(*refs, n_out)
    grads_ref = torch.autograd.grad(y_ref, refs, dy.double())
    for name, got, ref, inp in zip(
        ("y", "dx", "dblkdiag1", "dblkdiag2"), (y, *grads), (y_ref, *grads_ref), (y, x, w1, w2), strict=True
    ):
        assert got.shape == ref.shape and got.dtype == inp.dtype, name
        err = _rel_err(got, ref)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# Relative (to max |ref|) tolerances vs fp64. The interpreter rounds fp32 -> bf16 toward zero
# (a GPU rounds to nearest even), hence the bf16 margin.
_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


# ----------------------------------------------------------------------------------------------
# Parent process: availability, the interpreter suite as one child process, compile checks.
# ----------------------------------------------------------------------------------------------

if not _CHILD:

    def test_module_imports_and_reports_unavailable_on_cpu():
        from moreft.ops import triton_more

        x = torch.randn(3, 8)
        if not _HAS_TRITON:
            assert not triton_more.triton_available(x)
            with pytest.raises(RuntimeError, match="triton"):
                triton_more.more_triton(x, *_factors(8, 8, 2, 2, torch.float32), 8)
        elif not _INTERPRET_ENV:  # kernels built for GPUs: CPU tensors are not theirs
            assert not triton_more.triton_available(x)
            with pytest.raises(RuntimeError, match="CUDA"):
                triton_more.more_triton(x, *_factors(8, 8, 2, 2, torch.float32), 8)
        assert not triton_more.triton_available(x.double())

    @needs_triton
    def test_interpreter_suite():
        """All interpreter cases, in a child pytest with TRITON_INTERPRET=1 (see module docstring)."""
        env = dict(os.environ, TRITON_INTERPRET="1", MOREFT_TRITON_CHILD="1")
        env.pop("PYTEST_ADDOPTS", None)  # e.g. a CI --junitxml must not be overwritten by the child
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-o",
            "addopts=",
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            "--durations=3",
        ]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        out = proc.stdout + proc.stderr
        print(f"interpreter suite ({time.perf_counter() - start:.1f} s):\n{out[-3000:]}")
        assert proc.returncode == 0, f"interpreter suite failed (rc={proc.returncode}):\n{out[-12000:]}"
        assert " passed" in out

    def _compile_all(arch: int, dtype: str, bt: int, rank_tile: int, f_tile: int) -> set[tuple]:
        """Compile every kernel for ``sm_<arch>`` with launch-like constexprs.

        Returns ``{(kernel name, COMPUTE_DX, COMPUTE_DW1)}`` of what compiled (None where a kernel has no such flag).
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from moreft.ops import triton_more as tm

        prec = "ieee" if dtype == "fp32" else "tf32"
        kernels = [
            (tm._more_down_kernel, {"BT": bt, "BI": 64, "BR": rank_tile}),
            (tm._more_up_kernel, {"BT": bt, "BO": 64, "BF": f_tile}),
            (tm._more_dh_kernel, {"BT": bt, "BO": 64, "BF": f_tile}),
            (tm._more_dw2_kernel, {"BT": bt, "BO": 64, "BF": f_tile}),
            (
                tm._more_dx_dw1_kernel,
                {"BT": bt, "BI": 64, "BR": rank_tile, "COMPUTE_DX": True, "COMPUTE_DW1": True},
            ),
            (
                tm._more_dx_dw1_kernel,
                {"BT": bt, "BI": 64, "BR": rank_tile, "COMPUTE_DX": True, "COMPUTE_DW1": False},
            ),
            (
                tm._more_dx_dw1_kernel,
                {"BT": bt, "BI": 64, "BR": rank_tile, "COMPUTE_DX": False, "COMPUTE_DW1": True},
            ),
        ]
        built = set()
        for fn, const in kernels:
            const = dict(const, PRECISION=prec, UPCAST=False)
            sig, attrs = {}, {}
            for idx, name in enumerate(fn.arg_names):
                if name in const:
                    sig[name] = "constexpr"
                    continue
                ptr = "*fp32" if name == "part_ptr" else f"*{dtype}"
                sig[name] = ptr if name.endswith("_ptr") else "i32"
                attrs[(idx,)] = [["tt.divisibility", 16]]  # aligned, as for 4096-wide layers
            compiled = triton.compile(
                ASTSource(fn, sig, const, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": 4, "num_stages": 3},
            )
            assert compiled.asm["cubin"], fn.__name__
            if dtype != "fp32" and arch >= 80:
                assert "mma" in compiled.asm["ptx"], f"{fn.__name__}: no tensor-core instruction"
            built.add((fn.__name__, const.get("COMPUTE_DX"), const.get("COMPUTE_DW1")))
        return built

    @needs_triton
    @pytest.mark.skipif(_INTERPRET_ENV, reason="TRITON_INTERPRET=1: kernels are interpreted, not compiled")
    @pytest.mark.parametrize(
        "arch,dtype,bt,rank_tile,f_tile",
        [
            (90, "bf16", 64, 16, 16),  # H100/H200, MoRe default N=4, r=4
            (90, "bf16", 16, 32, 64),  # short T (smallest token tile), r=32 / N*r=64
            (90, "fp32", 64, 16, 16),  # IEEE fp32 dots (FMA, no tensor cores)
            (80, "fp16", 64, 16, 32),  # A100, N*r=32
        ],
    )
    def test_kernels_compile_to_cubin(arch, dtype, bt, rank_tile, f_tile):
        """No GPU needed: Triton lowers to PTX and runs its bundled ptxas for the target.

        What must compile is read from the code, not listed here: every ``@triton.jit`` kernel that
        :mod:`moreft.ops.triton_kernels` defines, and the dx/dw1 kernel in each variant the
        backward launches (dx and dw1, dx only with frozen factors, dw1 only with a frozen input).
        """
        import triton

        from moreft.ops import triton_kernels

        defined = {
            name
            for name, obj in vars(triton_kernels).items()
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction)
        }
        assert "_more_dx_dw1_kernel" in defined
        expected = {(name, None, None) for name in defined - {"_more_dx_dw1_kernel"}}
        expected |= {
            ("_more_dx_dw1_kernel", dx, dw1) for dx, dw1 in ((True, True), (True, False), (False, True))
        }
        assert _compile_all(arch, dtype, bt, rank_tile, f_tile) == expected


# ----------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1): correctness under the interpreter, small shapes.
# ----------------------------------------------------------------------------------------------

if _CHILD:
    from moreft.ops.triton_more import more_triton, triton_available

    pytestmark = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")

    # (in, out, nblocks, block_rank, leading shape, dtype)
    CASES = [
        pytest.param(48, 48, 4, 4, (64,), torch.float32, id="square-48-T64"),
        pytest.param(48, 24, 4, 4, (40,), torch.float32, id="rect-48to24"),
        pytest.param(24, 48, 4, 4, (40,), torch.float32, id="rect-24to48"),
        pytest.param(37, 45, 4, 3, (2, 5), torch.float32, id="nondiv-37to45-3d"),
        pytest.param(9, 10, 4, 2, (3, 7), torch.float32, id="empty-last-chunk-9to10"),
        pytest.param(40, 33, 3, 5, (33,), torch.float32, id="nblocks3-40to33"),
        pytest.param(40, 40, 1, 20, (17,), torch.float32, id="nblocks1-rank20"),
        pytest.param(48, 48, 8, 4, (2, 3, 5), torch.float32, id="nblocks8-R32-4d"),
        pytest.param(37, 45, 4, 3, (2, 20), torch.float16, id="fp16-nondiv"),
        pytest.param(48, 40, 4, 4, (48,), torch.float16, id="fp16-rect"),
        pytest.param(37, 45, 4, 3, (2, 20), torch.bfloat16, id="bf16-nondiv"),
        pytest.param(48, 40, 4, 4, (48,), torch.bfloat16, id="bf16-rect"),
    ]

    @pytest.mark.parametrize("n_in,n_out,nblocks,rank,lead,dtype", CASES)
    def test_matches_reference(n_in, n_out, nblocks, rank, lead, dtype):
        w1, w2 = _factors(n_in, n_out, nblocks, rank, dtype)
        x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(2)).to(dtype)
        _compare(more_triton, x, w1, w2, n_out, _TOL[dtype])

    @pytest.mark.parametrize(
        "n_in,n_out,nblocks,rank,rule",
        [
            (20, 36, 8, 2, "official"),
            (37, 13, 4, 3, "official"),
            (12, 12, 4, 5, "official"),
            (13, 40, 4, 2, "official-int"),
        ],
    )
    def test_official_block_shapes_match_reference(n_in, n_out, nblocks, rank, rule):
        """The MoRe repository's block shapes (dropped blocks, larger out blocks, rank above a block)."""
        from moreft.config import BlockRule
        from moreft.ops.monarch import block_shapes

        n, in_blk, out_blk = block_shapes(n_in, n_out, nblocks, BlockRule(rule))
        gen = torch.Generator().manual_seed(0)
        w1 = torch.randn(n, rank, in_blk, generator=gen) / in_blk**0.5
        w2 = torch.randn(n, out_blk, rank, generator=gen) / rank**0.5
        x = torch.randn(2, 9, n_in, generator=gen)
        _compare(more_triton, x, w1, w2, n_out, _TOL[torch.float32])

    def test_available_in_interpreter():
        assert triton_available(torch.randn(2, 3))
        assert triton_available(torch.randn(2, 3, dtype=torch.bfloat16))
        assert not triton_available(torch.randn(2, 3, dtype=torch.float64))
        assert not triton_available(torch.ones(2, 3, dtype=torch.int32))

    def test_fp32_factors_with_bf16_input():
        """fp32 master factors, bf16 activations: grads come back fp32, output stays bf16."""
        w1, w2 = _factors(37, 45, 4, 3, torch.float32)
        x = torch.randn(30, 37).to(torch.bfloat16)
        _compare(more_triton, x, w1, w2, 45, _TOL[torch.bfloat16])

    def test_partial_gradients_and_no_grad():
        w1, w2 = _factors(37, 45, 4, 3, torch.float32)
        x = torch.randn(20, 37)
        ref = more_reference(x, w1, w2, 45)
        with torch.no_grad():
            assert torch.allclose(more_triton(x, w1, w2, 45), ref, atol=1e-5)
        for wanted in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
            inputs = [t.clone().requires_grad_(w) for t, w in zip((x, w1, w2), wanted, strict=True)]
            got = torch.autograd.grad(
                more_triton(*inputs, 45).square().sum(), [t for t in inputs if t.requires_grad]
            )
            refs = [t.clone().requires_grad_(w) for t, w in zip((x, w1, w2), wanted, strict=True)]
            exp = torch.autograd.grad(
                more_reference(*refs, 45).square().sum(), [t for t in refs if t.requires_grad]
            )
            for g, e in zip(got, exp, strict=True):
                assert torch.allclose(g, e, rtol=1e-4, atol=1e-5), wanted

    def test_noncontiguous_input_and_module_use():
        w1, w2 = _factors(24, 20, 4, 2, torch.float32)
        x = torch.randn(24, 6, 5).permute(1, 2, 0)  # (6, 5, 24), not contiguous
        assert not x.is_contiguous()
        _compare(more_triton, x, w1, w2, 20, 1e-5)

    def test_empty_batch():
        w1, w2 = _factors(24, 20, 4, 2, torch.float32)
        x = torch.randn(0, 3, 24, requires_grad=True)
        w1.requires_grad_()
        y = more_triton(x, w1, w2, 20)
        assert y.shape == (0, 3, 20)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.count_nonzero(w1.grad) == 0

    def test_rejects_bad_shapes():
        w1, w2 = _factors(24, 20, 4, 2, torch.float32)
        with pytest.raises(ValueError):
            more_triton(torch.randn(3, 25), w1, w2, 20)  # more features than N * I
        with pytest.raises(ValueError):
            more_triton(torch.randn(3, 24), w1, w2, 21)  # more outputs than N * O
        with pytest.raises(ValueError):
            more_triton(torch.randn(3, 24), w1, w2[:, :, :1], 20)  # rank mismatch
        with pytest.raises(TypeError):
            more_triton(torch.randn(3, 24, dtype=torch.float64), w1, w2, 20)

    @pytest.mark.parametrize("fused", [True, False], ids=["fused-path", "adapter-path"])
    def test_more_layer_dispatches_to_triton(fused):
        """MoReLinear in mode 'on' (CPU under the interpreter) equals mode 'off' on y and every grad."""
        from torch import nn

        import moreft
        from moreft.ops import triton_more

        torch.manual_seed(0)
        base = nn.Linear(37, 45)
        layer = moreft.layers.MoReLinear(base, moreft.MoReConfig(nblocks=4, block_rank=3))
        layer.fused = fused
        with torch.no_grad():
            layer.blkdiag2.normal_()
        x = torch.randn(2, 9, 37)
        results = {}
        for mode in ("off", "on"):
            previous = triton_more.set_triton_mode(mode)
            try:
                xi = x.clone().requires_grad_()
                y = layer(xi)
                y.square().sum().backward()
                results[mode] = (
                    y.detach(),
                    xi.grad,
                    layer.blkdiag1.grad.clone(),
                    layer.blkdiag2.grad.clone(),
                )
                layer.zero_grad()
            finally:
                triton_more.set_triton_mode(previous)
        for name, got, ref in zip(
            ("y", "dx", "dblkdiag1", "dblkdiag2"), results["on"], results["off"], strict=True
        ):
            assert _rel_err(got, ref) <= _TOL[torch.float32], name
