"""What a trained adapter learned, in numbers: ΔW's spectrum, its alignment with W, its weight distribution.

Pure functions of tensors (float64 inside), used by ``moreft inspect``:

* :func:`singular_values_above`: how many singular values of ``ΔW`` exceed a threshold (MoRA paper,
  Figure 5 counts those above 0.1: a high-rank update has many).
* :func:`subspace_similarity`: the LoRA paper's normalised subspace similarity (Hu et al. 2021,
  Section 7, ``φ(A, B, i, j) = ||U_A^iᵀ U_B^j||_F² / min(i, j)``) between the top-``r`` singular
  vectors of ``ΔW`` and of the base weight ``W``, for the output (left) and input (right) sides. 1
  means ΔW acts inside W's top-``r`` directions, 0 orthogonal to them; two random ``r``-dimensional
  subspaces of ``R^m`` give ``r / m`` on average (reported as ``chance``).
* :func:`gaussian_fit`: mean, standard deviation, skewness, excess kurtosis and the Kolmogorov-Smirnov
  distance to the fitted normal of a set of weights (MoRe paper, Appendix D: trained block-diagonal
  weights approach a Gaussian).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .errors import ConfigError

#: MoRA's Figure 5 threshold on the singular values of ΔW.
DEFAULT_SV_THRESHOLD = 0.1
#: Top singular directions compared by :func:`subspace_similarity` (LoRA's usual rank 8).
DEFAULT_SUBSPACE_RANK = 8
#: Singular values below ``RANK_RTOL * sigma_max`` count as zero (ΔW is built in fp32).
RANK_RTOL = 1e-4


def singular_values_above(delta: Tensor, threshold: float = DEFAULT_SV_THRESHOLD) -> int:
    """The number of singular values of ``delta (out, in)`` strictly above ``threshold`` (absolute).

    Raises:
        ConfigError: ``threshold`` not a finite number >= 0.
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 <= threshold < math.inf
    ):
        raise ConfigError(f"sv threshold={threshold!r} must be a finite number >= 0")
    return int((torch.linalg.svdvals(delta.detach().double()) > threshold).sum())


def numerical_rank(singular_values: Tensor) -> int:
    """Singular values above ``RANK_RTOL`` times the largest (0 for a zero matrix)."""
    top = float(singular_values[0]) if singular_values.numel() else 0.0
    return int((singular_values > RANK_RTOL * top).sum()) if top > 0 else 0


@dataclass(frozen=True)
class SubspaceSimilarity:
    """φ between the top-``rank`` singular subspaces of ΔW and W.

    Attributes:
        rank: ``r`` used: the one asked for, capped at the numerical rank of ΔW (beyond it ΔW's
            singular vectors are arbitrary).
        output: φ of the left singular vectors (output space, ``R^out``), in [0, 1].
        input: φ of the right singular vectors (input space, ``R^in``), in [0, 1].
        chance_output: ``r / out``, the mean φ of two random r-dimensional subspaces of ``R^out``.
        chance_input: ``r / in``.
    """

    rank: int
    output: float
    input: float
    chance_output: float
    chance_input: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def subspace_similarity(
    delta: Tensor, weight: Tensor, rank: int = DEFAULT_SUBSPACE_RANK
) -> SubspaceSimilarity | None:
    """``φ = ||U_ΔW[:, :r]ᵀ U_W[:, :r]||_F² / r`` (and the same for the right vectors ``V``).

    Args:
        delta: ``ΔW (out, in)``.
        weight: the base weight ``W (out, in)``.
        rank: ``r`` asked for; capped at the numerical rank of ``delta``.

    Returns:
        None when ``delta`` is zero (no subspace to compare).

    Raises:
        ConfigError: ``rank`` not an integer >= 1, or shapes that differ.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"subspace rank={rank!r} must be an integer >= 1")
    if delta.shape != weight.shape or delta.dim() != 2:
        raise ConfigError(f"ΔW {list(delta.shape)} and W {list(weight.shape)} must be matrices of one shape")
    u_d, s_d, vh_d = torch.linalg.svd(delta.detach().double(), full_matrices=False)  # (out, q), (q,), (q, in)
    u_w, _, vh_w = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = min(rank, numerical_rank(s_d))
    if r == 0:
        return None
    out_f, in_f = delta.shape
    left = float(torch.linalg.matrix_norm(u_d[:, :r].T @ u_w[:, :r]).square()) / r  # (r, out) @ (out, r)
    right = float(torch.linalg.matrix_norm(vh_d[:r] @ vh_w[:r].T).square()) / r  # (r, in) @ (in, r)
    return SubspaceSimilarity(r, left, right, r / out_f, r / in_f)


@dataclass(frozen=True)
class GaussianFit:
    """A normal distribution fitted to weights by moments, and how far the weights are from it.

    Attributes:
        count: number of values.
        mean, std: the fit (population standard deviation).
        skewness: third standardised moment (0 for a Gaussian).
        excess_kurtosis: fourth standardised moment minus 3 (0 for a Gaussian, -1.2 for a uniform).
        ks: Kolmogorov-Smirnov distance ``sup |F_n(x) - Φ((x - mean) / std)|`` (about
            ``0.87 / sqrt(count)`` for a true Gaussian sample).
    """

    count: int
    mean: float
    std: float
    skewness: float
    excess_kurtosis: float
    ks: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def gaussian_fit(values: Tensor) -> GaussianFit:
    """Fit ``N(mean, std²)`` to ``values`` (any shape, flattened) and measure the misfit.

    Raises:
        ConfigError: fewer than 2 values, or values that are not finite.
    """
    x = values.detach().double().flatten()
    if x.numel() < 2 or not bool(torch.isfinite(x).all()):
        raise ConfigError(f"a Gaussian fit needs at least 2 finite values (got {x.numel()})")
    mean = x.mean()
    centred = x - mean
    std = centred.square().mean().sqrt()
    if float(std) == 0.0:
        return GaussianFit(x.numel(), float(mean), 0.0, 0.0, 0.0, 1.0)
    z = centred / std
    cdf = torch.special.ndtr(z.sort().values)  # Φ at the sorted standardised values
    n = x.numel()
    steps = torch.arange(n + 1, dtype=torch.float64) / n  # F_n just after each sorted value
    ks = torch.maximum((steps[1:] - cdf).abs().max(), (cdf - steps[:-1]).abs().max())
    return GaussianFit(
        n, float(mean), float(std), float(z.pow(3).mean()), float(z.pow(4).mean() - 3.0), float(ks)
    )
