"""Looking inside a trained adapter: per-layer size, rank and norm of ΔW, and a |ΔW| heat map."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import moreft
from moreft.errors import ConfigError, OutputError
from moreft.lock import folder_lock
from moreft.train.plots import is_moreft_png, plot_heatmap
from moreft.train.rundir import RunDir, load_trained

#: Singular values below ``RANK_RTOL * sigma_max`` count as zero (ΔW is built in fp32).
RANK_RTOL = 1e-4


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
    """

    name: str
    shape: tuple[int, int]
    params: int
    rank: int
    max_rank: int
    fro_norm: float


@dataclass(frozen=True)
class InspectReport:
    """What :func:`inspect_run` found.

    Attributes:
        run_dir: The run inspected.
        method: The adapter's config as a dict.
        layers: Per-layer statistics, in module order.
        heatmap: The |ΔW| PNG written (None if not requested).
        heatmap_layer: The layer shown in it.
    """

    run_dir: Path
    method: dict
    layers: list[LayerStats] = field(default_factory=list)
    heatmap: Path | None = None
    heatmap_layer: str | None = None

    def to_markdown(self) -> str:
        """The per-layer table as Markdown."""
        lines = ["| layer | shape (out, in) | params | rank of ΔW | ‖ΔW‖_F |", "|---|---|---:|---:|---:|"]
        for s in self.layers:
            lines.append(f"| {s.name} | {s.shape[0]}×{s.shape[1]} | {s.params:,} | {s.rank} / {s.max_rank} | "
                         f"{s.fro_norm:.4g} |")
        total = sum(s.params for s in self.layers)
        lines.append(f"| **total ({len(self.layers)} layers)** | | **{total:,}** | | |")
        return "\n".join(lines)


def monarch_row_order(out_features: int, nblocks: int) -> list[int]:
    """Output rows grouped by Monarch block: MoRe writes output ``p * N + b`` from block ``b``."""
    return [row for b in range(nblocks) for row in range(b, out_features, nblocks)]


def layer_stats(name: str, layer: moreft.AdapterLayer) -> LayerStats:
    """Size, numerical rank and Frobenius norm of one layer's ΔW."""
    with torch.no_grad():
        delta = layer.delta_weight().detach().double().cpu()
        sv = torch.linalg.svdvals(delta)
        top = float(sv[0]) if sv.numel() else 0.0
        rank = int((sv > RANK_RTOL * top).sum()) if top > 0 else 0
    params = sum(p.numel() for p in layer.adapter_params().values())
    return LayerStats(name, (layer.out_features, layer.in_features), params, rank, min(delta.shape),
                      float(torch.linalg.matrix_norm(delta)))


def inspect_run(run_dir: str | os.PathLike, layer: str | None = None, heatmap: str | os.PathLike | None = None,
                ) -> InspectReport:
    """Per-layer statistics of a run's adapter and a heat map of one layer's |ΔW|.

    Args:
        run_dir: A finished run directory.
        layer: Layer to draw (a qualified name or a unique suffix); default the first adapted layer.
        heatmap: PNG path; default ``<run_dir>/delta_<layer>.png``. An existing file there is
            replaced only if it is a PNG moreft wrote.

    Returns:
        An :class:`InspectReport`.

    Raises:
        ConfigError: ``layer`` matches no adapted layer or more than one.
        moreft.AdapterFileError: The run has no adapter.
        OutputError: ``heatmap`` names a file moreft did not write, or the heat map goes into a
            run that another process is writing.
    """
    if heatmap is not None and os.path.lexists(heatmap) and not is_moreft_png(Path(heatmap)):
        raise OutputError(f"heat map path {str(heatmap)!r} exists and is not a PNG moreft wrote; moreft "
                          "will not replace it. Choose another --heatmap path")
    _, _, model, _ = load_trained(run_dir)
    layers = moreft.adapter_layers(model)
    stats = [layer_stats(n, lay) for n, lay in layers.items()]
    if layer is None:
        chosen = next(iter(layers))
    else:
        matches = [n for n in layers if n == layer or n.endswith("." + layer)]
        if len(matches) != 1:
            shown = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
            raise ConfigError(f"layer {layer!r} matches {len(matches)} adapted layers "
                              f"({matches[:4] if matches else 'none'}); adapted layers: {shown}")
        chosen = matches[0]
    out = Path(heatmap) if heatmap is not None else RunDir(Path(run_dir)).path / f"delta_{chosen}.png"
    config = moreft.adapter_config(model)
    with torch.no_grad():
        delta = layers[chosen].delta_weight()
    order, label = None, ""
    if config is not None and config.method is moreft.Method.MORE:
        order = monarch_row_order(delta.shape[0], config.nblocks)
        label = f"rows grouped by Monarch output block (N={config.nblocks})"
    run = Path(os.path.realpath(run_dir))
    into_run = run == Path(os.path.realpath(out.parent)) or run in Path(os.path.realpath(out.parent)).parents
    with folder_lock(run, "run directory") if into_run else contextlib.nullcontext():
        plot_heatmap(delta, out, title=f"|ΔW| of {chosen} ({config.method.value if config else '?'})",
                     row_order=order, order_label=label)
    return InspectReport(Path(run_dir), config.to_dict() if config else {}, stats, out, chosen)
