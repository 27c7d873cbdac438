"""Looking inside a trained adapter: per-layer size, rank and norm of ΔW, a |ΔW| heat map, and
(:mod:`moreft.analysis`) the count of ΔW's singular values above a threshold (MoRA Figure 5), the
subspace similarity φ between ΔW and the top singular vectors of W (LoRA Section 7), and the
distribution of the learned adapter weights against a fitted Gaussian (MoRe Appendix D).

ΔW is always what training changed, ``W_trained - W_initial``. For an adapter that is the adapter's
own update; after ``merge_every`` merges (ReLoRA / ReMoRA) the earlier cycles sit in the base
weights, so ΔW adds ``W_base_now - W_initial``; for full fine-tuning (``method: full``) it is the
change of each targeted linear layer (``target_modules``, or the model's default targets). The
initial weights come from loading the base again (a from-scratch base is rebuilt from its seed and
checked against the digest the run recorded). φ compares ΔW with ``W_initial``."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import moreft
from moreft.analysis import (
    DEFAULT_SUBSPACE_RANK,
    DEFAULT_SV_THRESHOLD,
    RANK_RTOL,
    GaussianFit,
    SubspaceSimilarity,
    gaussian_fit,
    numerical_rank,
    subspace_similarity,
)
from moreft.errors import ConfigError, OutputError
from moreft.lock import folder_lock
from moreft.train.deltas import oriented, run_deltas
from moreft.train.plots import is_moreft_png, plot_heatmap, plot_weight_distributions
from moreft.train.rundir import RunDir

__all__ = [
    "RANK_RTOL",
    "WEIGHTS_PLOT",
    "InspectReport",
    "LayerStats",
    "inspect_model",
    "inspect_run",
    "layer_stats",
    "monarch_row_order",
]

#: The weight-distribution figure ``moreft inspect --plots`` writes into the run directory.
WEIGHTS_PLOT = "weights.png"


@dataclass(frozen=True)
class LayerStats:
    """One adapted layer.

    Attributes:
        name: Qualified module name.
        shape: ``(out_features, in_features)``.
        params: Trainable adapter parameters of the layer.
        rank: Numerical rank of ΔW (singular values above ``RANK_RTOL * sigma_max``).
        max_rank: ``min(out, in)``.
        fro_norm: Frobenius norm of ΔW.
        sv_above: Singular values of ΔW above the report's ``sv_threshold`` (absolute).
        subspace: φ between ΔW's and W's top singular subspaces; None when ΔW = 0.
    """

    name: str
    shape: tuple[int, int]
    params: int
    rank: int
    max_rank: int
    fro_norm: float
    sv_above: int = 0
    subspace: SubspaceSimilarity | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "params": self.params,
            "rank": self.rank,
            "max_rank": self.max_rank,
            "fro_norm": self.fro_norm,
            "sv_above": self.sv_above,
            "subspace": self.subspace.to_dict() if self.subspace else None,
        }


@dataclass(frozen=True)
class InspectReport:
    """What :func:`inspect_run` found.

    Attributes:
        run_dir: The run inspected.
        method: The adapter's config as a dict.
        layers: Per-layer statistics, in module order.
        heatmap: The |ΔW| PNG written (None if not requested).
        heatmap_layer: The layer shown in it.
        sv_threshold: The threshold of ``LayerStats.sv_above``.
        subspace_rank: The ``r`` asked for φ (each layer caps it at the rank of its ΔW).
        weights: A Gaussian fit per adapter parameter (``blkdiag1``, ``matrix``, ``lora_A`` ...),
            pooled over every adapted layer.
        weights_plot: The weight-distribution PNG written (None if not requested).
    """

    run_dir: Path
    method: dict
    layers: list[LayerStats] = field(default_factory=list)
    heatmap: Path | None = None
    heatmap_layer: str | None = None
    sv_threshold: float = DEFAULT_SV_THRESHOLD
    subspace_rank: int = DEFAULT_SUBSPACE_RANK
    weights: dict[str, GaussianFit] = field(default_factory=dict)
    weights_plot: Path | None = None

    def to_markdown(self) -> str:
        """The per-layer table as Markdown."""
        header = (
            f"| layer | shape (out, in) | params | rank of ΔW | ‖ΔW‖_F | σ(ΔW) > {self.sv_threshold:g} | "
            "φ out / in (r) |"
        )
        lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
        for s in self.layers:
            phi = (
                f"{s.subspace.output:.3f} / {s.subspace.input:.3f} ({s.subspace.rank})" if s.subspace else "-"
            )
            lines.append(
                f"| {s.name} | {s.shape[0]}×{s.shape[1]} | {s.params:,} | {s.rank} / {s.max_rank} | "
                f"{s.fro_norm:.4g} | {s.sv_above} | {phi} |"
            )
        total = sum(s.params for s in self.layers)
        lines.append(
            f"| **total ({len(self.layers)} layers)** | | **{total:,}** | | | "
            f"{sum(s.sv_above for s in self.layers)} | |"
        )
        return "\n".join(lines)

    def weights_markdown(self) -> str:
        """The Gaussian fit of each adapter parameter as Markdown."""
        lines = [
            "| adapter weights | values | mean | std | skewness | excess kurtosis | KS to the fit |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, f in self.weights.items():
            lines.append(
                f"| {name} | {f.count:,} | {f.mean:.3g} | {f.std:.3g} | {f.skewness:.3f} | "
                f"{f.excess_kurtosis:.3f} | {f.ks:.4f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (``moreft inspect --json``)."""
        return {
            "run_dir": str(self.run_dir),
            "method": self.method,
            "sv_threshold": self.sv_threshold,
            "subspace_rank": self.subspace_rank,
            "layers": [s.to_dict() for s in self.layers],
            "weights": {n: f.to_dict() for n, f in self.weights.items()},
            "heatmap": str(self.heatmap) if self.heatmap else None,
            "heatmap_layer": self.heatmap_layer,
            "weights_plot": str(self.weights_plot) if self.weights_plot else None,
        }


def monarch_row_order(out_features: int, nblocks: int) -> list[int]:
    """Output rows grouped by Monarch block: MoRe writes output ``p * N + b`` from block ``b``."""
    return [row for b in range(nblocks) for row in range(b, out_features, nblocks)]


def delta_stats(
    name: str,
    delta: torch.Tensor,
    weight: torch.Tensor,
    params: int,
    sv_threshold: float = DEFAULT_SV_THRESHOLD,
    subspace_rank: int = DEFAULT_SUBSPACE_RANK,
) -> LayerStats:
    """Size, numerical rank, Frobenius norm, singular values above ``sv_threshold`` and φ of one ΔW
    (``(out, in)``), φ against ``weight`` (``(out, in)``); ``params`` is what trained in the layer."""
    with torch.no_grad():
        delta = delta.detach().double().cpu()
        sv = torch.linalg.svdvals(delta)
        subspace = subspace_similarity(delta, weight.detach().double().cpu(), subspace_rank)
    return LayerStats(
        name,
        (delta.shape[0], delta.shape[1]),
        params,
        numerical_rank(sv),
        min(delta.shape),
        float(torch.linalg.matrix_norm(delta)),
        int((sv > sv_threshold).sum()),
        subspace,
    )


def layer_stats(
    name: str,
    layer: moreft.AdapterLayer,
    sv_threshold: float = DEFAULT_SV_THRESHOLD,
    subspace_rank: int = DEFAULT_SUBSPACE_RANK,
) -> LayerStats:
    """:func:`delta_stats` of one adapter layer's own ΔW, φ against the base weight it sits on (unmerged)."""
    with torch.no_grad():
        delta = layer.delta_weight()
    params = sum(p.numel() for p in layer.adapter_params().values())
    return delta_stats(name, delta, oriented(layer.base_layer), params, sv_threshold, subspace_rank)


def adapter_weights(layers: dict[str, moreft.AdapterLayer]) -> dict[str, torch.Tensor]:
    """Every adapter matrix's entries, pooled over the layers by parameter name (scalars left out)."""
    pooled: dict[str, list[torch.Tensor]] = {}
    for layer in layers.values():
        for short, p in layer.adapter_params().items():
            if p.numel() > 1:
                pooled.setdefault(short, []).append(p.detach().flatten().double().cpu())
    return {short: torch.cat(parts) for short, parts in pooled.items()}


def inspect_model(
    model: torch.nn.Module,
    sv_threshold: float = DEFAULT_SV_THRESHOLD,
    subspace_rank: int = DEFAULT_SUBSPACE_RANK,
) -> tuple[list[LayerStats], dict[str, GaussianFit]]:
    """Per-layer statistics and the per-parameter Gaussian fits of a model carrying an adapter.

    Raises:
        ConfigError: a bad ``sv_threshold`` (not finite, or < 0) or ``subspace_rank`` (not an integer >= 1).
    """
    _check_options(sv_threshold, subspace_rank)
    layers = moreft.adapter_layers(model)
    stats = [layer_stats(n, lay, sv_threshold, subspace_rank) for n, lay in layers.items()]
    return stats, {n: gaussian_fit(v) for n, v in adapter_weights(layers).items()}


def _check_options(sv_threshold: float, subspace_rank: int) -> None:
    if (
        isinstance(sv_threshold, bool)
        or not isinstance(sv_threshold, (int, float))
        or not 0 <= sv_threshold < math.inf
    ):
        raise ConfigError(f"--sv-threshold {sv_threshold!r} must be a finite number >= 0")
    if isinstance(subspace_rank, bool) or not isinstance(subspace_rank, int) or subspace_rank < 1:
        raise ConfigError(f"--subspace-rank {subspace_rank!r} must be an integer >= 1")


def _refuse_foreign_png(path: str | os.PathLike | None, what: str, flag: str) -> None:
    if path is not None and os.path.lexists(path) and not is_moreft_png(Path(path)):
        raise OutputError(
            f"{what} path {str(path)!r} exists and is not a PNG moreft wrote; moreft "
            f"will not replace it. Choose another {flag} path"
        )


def inspect_run(
    run_dir: str | os.PathLike,
    layer: str | None = None,
    heatmap: str | os.PathLike | None = None,
    sv_threshold: float = DEFAULT_SV_THRESHOLD,
    subspace_rank: int = DEFAULT_SUBSPACE_RANK,
    plots: bool = False,
    weights_plot: str | os.PathLike | None = None,
) -> InspectReport:
    """Per-layer statistics of a run's adapter, a heat map of one layer's |ΔW| and the weight distributions.

    Args:
        run_dir: A finished run directory.
        layer: Layer to draw (a qualified name or a unique suffix); default the first adapted layer.
        heatmap: PNG path; default ``<run_dir>/delta_<layer>.png``. An existing file there is
            replaced only if it is a PNG moreft wrote.
        sv_threshold: Count the singular values of ΔW above this (MoRA Figure 5: 0.1).
        subspace_rank: ``r`` of the subspace similarity φ (capped per layer at the rank of ΔW).
        plots: Also draw the adapter weights against their fitted Gaussians (MoRe Appendix D).
        weights_plot: That PNG's path (implies ``plots``); default ``<run_dir>/weights.png``,
            replaced only if moreft wrote it.

    Returns:
        An :class:`InspectReport`.

    Raises:
        ConfigError: ``layer`` matches no adapted layer or more than one; a bad ``sv_threshold`` or
            ``subspace_rank``.
        moreft.AdapterFileError: The run has no adapter.
        OutputError: ``heatmap`` or ``weights_plot`` names a file moreft did not write, or a PNG goes
            into a run that another process is writing.
    """
    _check_options(sv_threshold, subspace_rank)
    plots = plots or weights_plot is not None
    weights_out = None
    if plots:
        weights_out = (
            Path(weights_plot) if weights_plot is not None else RunDir(Path(run_dir)).path / WEIGHTS_PLOT
        )
    _refuse_foreign_png(heatmap, "heat map", "--heatmap")
    _refuse_foreign_png(weights_out, "weights plot", "--weights-plot")
    run_config, model, deltas = run_deltas(run_dir)
    layers = moreft.adapter_layers(model)
    stats = [delta_stats(n, d, w, p, sv_threshold, subspace_rank) for n, (d, w, p) in deltas.items()]
    fits = {n: gaussian_fit(v) for n, v in adapter_weights(layers).items()}
    if layer is None:
        chosen = next(iter(deltas))
    else:
        matches = [n for n in deltas if n == layer or n.endswith("." + layer)]
        if len(matches) != 1:
            shown = ", ".join(list(deltas)[:6]) + (", ..." if len(deltas) > 6 else "")
            raise ConfigError(
                f"layer {layer!r} matches {len(matches)} adapted layers "
                f"({matches[:4] if matches else 'none'}); adapted layers: {shown}"
            )
        chosen = matches[0]
    out = Path(heatmap) if heatmap is not None else RunDir(Path(run_dir)).path / f"delta_{chosen}.png"
    config = moreft.adapter_config(model)
    delta = deltas[chosen][0]
    order, label = None, ""
    if config is not None and config.method is moreft.Method.MORE:
        order = monarch_row_order(delta.shape[0], config.nblocks)
        label = f"rows grouped by Monarch output block (N={config.nblocks})"
    run = Path(os.path.realpath(run_dir))
    into_run = any(
        run == Path(os.path.realpath(p.parent)) or run in Path(os.path.realpath(p.parent)).parents
        for p in (out, weights_out)
        if p is not None
    )
    method = config.method.value if config else run_config.method
    with folder_lock(run, "run directory") if into_run else contextlib.nullcontext():
        plot_heatmap(delta, out, title=f"|ΔW| of {chosen} ({method})", row_order=order, order_label=label)
        if weights_out is not None and fits:
            plot_weight_distributions(
                adapter_weights(layers),
                fits,
                weights_out,
                title=f"{method} adapter weights over {len(layers)} layers vs fitted Gaussians",
            )
    return InspectReport(
        Path(run_dir),
        config.to_dict() if config else {"method": run_config.method},
        stats,
        out,
        chosen,
        sv_threshold,
        subspace_rank,
        fits,
        weights_out if fits else None,
    )
