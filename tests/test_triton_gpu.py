"""Triton MoRe kernels (see ``test_triton.py``): full-size GPU checks and the triton mode switch."""

from __future__ import annotations

import pytest
import torch
from test_triton import _CHILD, _compare, _factors, needs_cuda

from moreft.ops.monarch import more_forward

# ----------------------------------------------------------------------------------------------
# GPU: full-size checks (skip without CUDA). Timings belong to docs/triton.md's benchmark plan.
# ----------------------------------------------------------------------------------------------

if not _CHILD:

    @needs_cuda
    @pytest.mark.parametrize(
        "n_in,n_out,nblocks,rank,lead,dtype",
        [
            pytest.param(4096, 4096, 4, 4, (2048,), torch.bfloat16, id="llama-qkvo-T2048-bf16"),
            pytest.param(4096, 11008, 4, 8, (2, 512), torch.bfloat16, id="llama-up-2x512-bf16"),
            pytest.param(11008, 4096, 4, 8, (2, 512), torch.bfloat16, id="llama-down-2x512-bf16"),
            pytest.param(4096, 4096, 32, 2, (8, 256), torch.bfloat16, id="nblocks32-bf16"),
            pytest.param(4000, 3001, 3, 7, (1000,), torch.float16, id="nondiv-fp16"),
            pytest.param(1536, 1000, 4, 4, (2, 300), torch.float32, id="nondiv-fp32"),
        ],
    )
    def test_gpu_full_size(n_in, n_out, nblocks, rank, lead, dtype):
        from moreft.ops.triton_more import more_triton, triton_available

        w1, w2 = _factors(n_in, n_out, nblocks, rank, dtype, device="cuda")
        x = torch.randn(*lead, n_in, device="cuda", dtype=dtype)
        assert triton_available(x)
        # reference: the folded two-GEMM path in fp64 on the GPU (same meaning as more_reference)
        tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
        _compare(more_triton, x, w1, w2, n_out, tol, ref_fn=more_forward)

    @needs_cuda
    def test_gpu_matches_pseudocode_and_mixed_precision():
        from moreft.ops.triton_more import more_triton

        w1, w2 = _factors(4096, 4096, 4, 4, torch.float32, device="cuda")
        x = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16)
        _compare(more_triton, x, w1, w2, 4096, 1.5e-2)  # fp32 factors, bf16 activations


if not _CHILD:

    def test_triton_mode_switch_and_validation(monkeypatch):
        from moreft.ops import triton_more

        assert triton_more.triton_mode() in triton_more.TRITON_MODES
        previous = triton_more.set_triton_mode("off")
        try:
            assert not triton_more.use_triton(torch.randn(2, 3))
            with pytest.raises(
                ValueError, match=r"triton mode 'fast' must be one of \('auto', 'off', 'on'\)"
            ):
                triton_more.set_triton_mode("fast")
            triton_more.set_triton_mode("auto")
            assert not triton_more.use_triton(torch.randn(2, 3))  # auto: CUDA tensors only
        finally:
            triton_more.set_triton_mode(previous)
        monkeypatch.setenv("MOREFT_TRITON", "0")
        assert triton_more._mode_from_env() == "off"
        monkeypatch.setenv("MOREFT_TRITON", "sometimes")
        with pytest.raises(ValueError, match=r"MOREFT_TRITON='sometimes' must be one of"):
            triton_more._mode_from_env()
