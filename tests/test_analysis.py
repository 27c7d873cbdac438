"""moreft.analysis and the statistics of ``moreft inspect``, against direct torch.linalg computations.

Adapters are set by hand (no training): the numbers must equal what the definitions give.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_adapters
from torch import nn

import moreft
from moreft.analysis import gaussian_fit, singular_values_above, subspace_similarity
from moreft.train.inspection import inspect_model, layer_stats
from moreft.train.plots import is_moreft_png, plot_weight_distributions

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def test_singular_values_above_counts_as_svdvals():
    u, v = _orthonormal(12, 0), _orthonormal(9, 1)
    s = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.11, 0.09, 0.05, 1e-3, 0.0], dtype=torch.float64)
    delta = u[:, :9] @ torch.diag(s) @ v.T  # (12, 9) with known singular values
    assert singular_values_above(delta, 0.1) == 5
    assert singular_values_above(delta, 1e-6) == 8  # the zero one, computed as ~1e-16, is not counted
    assert singular_values_above(delta, 0.3) == int((torch.linalg.svdvals(delta) > 0.3).sum()) == 3
    with pytest.raises(moreft.ConfigError, match="must be a finite number >= 0"):
        singular_values_above(delta, -1.0)


def test_subspace_similarity_is_one_inside_and_zero_outside_the_top_directions():
    u, v = _orthonormal(16, 2), _orthonormal(10, 3)
    w = u[:, :10] @ torch.diag(torch.linspace(10, 1, 10, dtype=torch.float64)) @ v.T  # (16, 10)
    inside = u[:, :3] @ torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ v[:, :3].T
    phi = subspace_similarity(inside, w, rank=3)
    assert phi.rank == 3 and phi.output == pytest.approx(1.0) and phi.input == pytest.approx(1.0)
    assert phi.chance_output == pytest.approx(3 / 16) and phi.chance_input == pytest.approx(3 / 10)
    outside = u[:, 5:8] @ v[:, 5:8].T  # W's 6th-8th directions: orthogonal to its top 3
    phi = subspace_similarity(outside, w, rank=3)
    assert phi.output == pytest.approx(0.0, abs=1e-12) and phi.input == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(inside, w, rank=8).rank == 3  # capped at rank(ΔW)
    assert subspace_similarity(torch.zeros_like(w), w) is None


def test_subspace_similarity_equals_the_lora_formula():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(20, 14, generator=gen, dtype=torch.float64)
    delta = torch.randn(20, 5, generator=gen, dtype=torch.float64) @ torch.randn(
        5, 14, generator=gen, dtype=torch.float64
    )
    r = 4
    u_d, _, vh_d = torch.linalg.svd(delta)
    u_w, _, vh_w = torch.linalg.svd(w)
    expected_out = float(((u_d[:, :r].T @ u_w[:, :r]) ** 2).sum()) / r  # ||U_ΔWᵀ U_W||_F² / r
    expected_in = float(((vh_d[:r] @ vh_w[:r].T) ** 2).sum()) / r
    phi = subspace_similarity(delta, w, r)
    assert phi.output == pytest.approx(expected_out, rel=1e-10) and phi.input == pytest.approx(
        expected_in, rel=1e-10
    )
    assert 0.0 <= phi.output <= 1.0 and 0.0 <= phi.input <= 1.0


def test_gaussian_fit_moments_and_ks():
    gen = torch.Generator().manual_seed(5)
    normal = torch.randn(20000, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    fit = gaussian_fit(normal)
    assert fit.count == 20000 and fit.mean == pytest.approx(float(normal.mean()))
    assert fit.std == pytest.approx(float(normal.std(unbiased=False)))
    assert abs(fit.skewness) < 0.05 and abs(fit.excess_kurtosis) < 0.1 and fit.ks < 0.015
    uniform = torch.rand(20000, generator=gen, dtype=torch.float64)
    fit = gaussian_fit(uniform)
    assert fit.excess_kurtosis == pytest.approx(-1.2, abs=0.05) and fit.ks > 0.04
    two = gaussian_fit(torch.tensor([-1.0, 1.0]))  # F_n jumps to 1/2 at -1 where Φ(-1) = 0.159
    assert two.std == 1.0 and two.ks == pytest.approx(0.5 - 0.5 * math.erfc(1 / math.sqrt(2)), abs=1e-12)
    with pytest.raises(moreft.ConfigError, match="at least 2 finite values"):
        gaussian_fit(torch.tensor([1.0, float("nan")]))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 20, dtype=torch.float64)
        self.b = nn.Linear(20, 24, dtype=torch.float64)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "config",
    [
        moreft.MoReConfig(target_modules=["a", "b"], nblocks=4, block_rank=2),
        moreft.MoRAConfig(target_modules=["a", "b"], rank=2, operator="sharing"),
        moreft.LoRAConfig(target_modules=["a", "b"], rank=3),
    ],
    ids=["more", "mora", "lora"],
)
def test_inspect_model_numbers_equal_direct_computations(config):
    torch.manual_seed(0)
    model = moreft.inject(Net(), config)
    randomize_adapters(model, std=0.3)
    stats, fits = inspect_model(model, sv_threshold=0.05, subspace_rank=3)
    assert [s.name for s in stats] == ["a", "b"]
    for s in stats:
        layer = model.get_submodule(s.name)
        delta, w = layer.delta_weight().detach(), layer.base_layer.weight.detach()
        sv = torch.linalg.svdvals(delta)
        assert s.sv_above == int((sv > 0.05).sum()) and s.fro_norm == pytest.approx(
            float(sv.square().sum().sqrt())
        )
        u_d, u_w = torch.linalg.svd(delta)[0], torch.linalg.svd(w)[0]
        assert s.subspace.rank == 3
        assert s.subspace.output == pytest.approx(
            float(((u_d[:, :3].T @ u_w[:, :3]) ** 2).sum()) / 3, rel=1e-9
        )
    names = {"more": {"blkdiag1", "blkdiag2"}, "mora": {"matrix"}, "lora": {"lora_A", "lora_B"}}[
        config.method.value
    ]
    assert set(fits) == names
    for name, fit in fits.items():
        values = torch.cat(
            [model.get_submodule(n).adapter_params()[name].detach().flatten() for n in ("a", "b")]
        )
        assert fit.count == values.numel() and fit.mean == pytest.approx(float(values.mean()))
        assert fit.std == pytest.approx(float(values.std(unbiased=False)))
    if (
        config.method is moreft.Method.MORE
    ):  # the default options of layer_stats: rank(ΔW) = nblocks * block_rank
        assert layer_stats("a", model.a).rank == 8


def test_inspect_model_skips_the_scalar_and_refuses_bad_options():
    model = moreft.inject(Net(), moreft.MoReConfig(target_modules=["a"], learnable_scale=True))
    randomize_adapters(model)
    _, fits = inspect_model(model)
    assert set(fits) == {"blkdiag1", "blkdiag2"}
    with pytest.raises(moreft.ConfigError, match=r"--sv-threshold -0.1 must be a finite number >= 0"):
        inspect_model(model, sv_threshold=-0.1)
    with pytest.raises(moreft.ConfigError, match=r"--subspace-rank 0 must be an integer >= 1"):
        inspect_model(model, subspace_rank=0)


def test_weight_distribution_plot_is_a_moreft_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    samples = {"blkdiag1": torch.randn(500, generator=gen), "blkdiag2": torch.rand(300, generator=gen)}
    fits = {n: gaussian_fit(v) for n, v in samples.items()}
    out = plot_weight_distributions(samples, fits, tmp_path / "w.png", title="t")
    assert out == tmp_path / "w.png" and is_moreft_png(out)
