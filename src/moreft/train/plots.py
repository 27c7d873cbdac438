"""PNG figures of runs, written atomically.

Figures are plain :class:`matplotlib.figure.Figure` objects rendered straight to PNG, never through
``pyplot``: no backend is chosen, no global figure state is kept, and importing this module leaves
matplotlib as the caller set it up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from moreft.safe_write import atomic_write_file

#: The PNG text chunk every figure moreft writes carries, so a later write knows the file is its own.
SOFTWARE = "moreft"


def is_moreft_png(path: Path) -> bool:
    """True when ``path`` is a regular file holding a PNG that moreft wrote (its ``Software`` text chunk)."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + SOFTWARE.encode() in head


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A new figure and its axes, like ``pyplot.subplots`` but owned by the caller (nothing global)."""
    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_png(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG through a temp file and an atomic rename.

    Raises:
        moreft.OutputError: ``path`` is a folder.
    """
    atomic_write_file(
        path,
        lambda tmp: fig.savefig(
            tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": SOFTWARE}
        ),
    )
    return path


def plot_run(records: Sequence[Mapping[str, Any]], metric: str, path: Path, title: str = "") -> Path:
    """Training loss (left axis) and ``eval_<metric>`` (right axis) against the optimizer step.

    Args:
        records: ``metrics.jsonl`` records.
        metric: Task metric name, e.g. ``"accuracy"``.
        path: Where to write the PNG.
        title: Figure title.
    """
    loss = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    key = f"eval_{metric}"
    evals = sorted({r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}.items())
    fig, ax = subplots(figsize=(7, 4))
    if loss:
        ax.plot(
            *zip(*loss, strict=True),
            color="tab:blue",
            marker="." if len(loss) < 30 else None,
            label="train loss",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), color="tab:orange", marker="o", label=key)
        ax2.set_ylabel(key, color="tab:orange")
        if all(0 <= v <= 1 for _, v in evals):  # a score in [0, 1]; perplexity keeps its own range
            ax2.set_ylim(0, 1.02)
    if not loss and not evals:
        ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "training")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def draw_pareto_front(ax: Any, front: Sequence[Mapping[str, Any]], value: str) -> None:
    """Draw a Pareto front on a metric-against-parameters plot: a step line through the front's
    points (sorted by ``params``), each ringed, labelled "Pareto front"; nothing if it is empty."""
    ordered = sorted(front, key=lambda r: r["params"])
    if not ordered:
        return
    ax.step(
        [r["params"] for r in ordered],
        [r[value] for r in ordered],
        where="post",
        color="black",
        linewidth=1.5,
        marker="o",
        markersize=11,
        markerfacecolor="none",
        label="Pareto front",
        zorder=4,
    )


def _save_params_plot(
    fig: Figure, ax: Any, metric: str, path: Path, title: str, legend: bool, fontsize: int
) -> Path:
    """Finish a metric-against-adapter-parameters plot (log x axis, labels, grid, legend) and save it."""
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log scale; head excluded)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs parameters")
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=fontsize, loc="best")
    return save_png(fig, path)


def plot_compare(rows: Sequence[Mapping[str, Any]], metric: str, path: Path, title: str = "") -> Path:
    """Metric (mean ± std over seeds) against trainable adapter parameters, log x axis.

    Args:
        rows: One mapping per method with ``label``, ``params``, ``mean``, ``std``.
        metric: Name of the plotted metric (axis label).
        path: Where to write the PNG.
        title: Figure title.
    """
    fig, ax = subplots(figsize=(7, 4.5))
    for row in rows:
        ax.errorbar([row["params"]], [row["mean"]], yerr=[row["std"]], fmt="o", capsize=4, label=row["label"])
        ax.annotate(
            row["label"], (row["params"], row["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8
        )
    return _save_params_plot(fig, ax, metric, path, title, legend=bool(rows), fontsize=8)


def plot_study(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    metric: str,
    path: Path,
    title: str = "",
    margin: float = 0.005,
) -> Path:
    """A study's arms: metric (mean ± std over seeds) against adapter parameters (log x), one colour per
    method family, the Pareto front as a step line, and the reference's mean with its ``±margin`` band.

    Args:
        rows: One mapping per arm with ``arm``, ``family``, ``params``, ``mean``, ``std``, ``reference``.
        front: The Pareto-front arms (a subset of ``rows``).
        metric: Name of the plotted metric (axis label).
        path: Where to write the PNG.
        title: Figure title.
        margin: Half-width of the band around the reference (metric units; 0.005 = 0.5 points).
    """
    fig, ax = subplots(figsize=(8, 5))
    colours: dict[str, Any] = {}
    for row in rows:
        family = str(row["family"])
        first = family not in colours
        colours.setdefault(family, f"C{len(colours) % 10}")
        ax.errorbar(
            [row["params"]],
            [row["mean"]],
            yerr=[row["std"]],
            fmt="s" if row.get("reference") else "o",
            capsize=3,
            color=colours[family],
            label=family if first else None,
        )
        ax.annotate(
            str(row["arm"]),
            (row["params"], row["mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=6,
        )
    draw_pareto_front(ax, front, value="mean")
    ref = next((r for r in rows if r.get("reference")), None)
    if ref is not None:
        ax.axhspan(
            ref["mean"] - margin,
            ref["mean"] + margin,
            color="grey",
            alpha=0.2,
            label=f"{ref['arm']} ± {margin * 100:g} pt",
        )
    return _save_params_plot(fig, ax, metric, path, title, legend=bool(rows), fontsize=7)


def plot_heatmap(
    delta: torch.Tensor,
    path: Path,
    title: str = "",
    max_side: int = 384,
    row_order: Sequence[int] | None = None,
    order_label: str = "",
) -> Path:
    """|ΔW| of one layer as an image (rows = outputs, columns = inputs).

    Matrices larger than ``max_side`` are shown as their top-left ``max_side`` x ``max_side``
    corner so that single blocks stay visible. With ``row_order`` a second panel shows the rows in
    that order (e.g. MoRe's interleaved outputs grouped by Monarch block, so blocks line up).
    """
    data = delta.detach().abs().float().cpu()
    panels = [("as stored", data)]
    if row_order is not None:
        panels.append((order_label or "rows reordered", data[torch.as_tensor(list(row_order))]))
    fig, axes = subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    for ax, (label, matrix) in zip(axes[0], panels, strict=True):
        shown = matrix[:max_side, :max_side]
        im = ax.imshow(shown.numpy(), cmap="magma", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="|ΔW|")
        crop = (
            ""
            if shown.shape == matrix.shape
            else f", top-left {shown.shape[0]}x{shown.shape[1]} of {matrix.shape[0]}x{matrix.shape[1]}"
        )
        ax.set_title(f"{label}{crop}", fontsize=9)
        ax.set_xlabel("input feature")
        ax.set_ylabel("output feature")
    fig.suptitle(title or "|ΔW|", fontsize=10)
    return save_png(fig, path)


def plot_weight_distributions(
    samples: Mapping[str, torch.Tensor], fits: Mapping[str, Any], path: Path, title: str = "", bins: int = 80
) -> Path:
    """Histogram (density) of each group of adapter weights against its fitted Gaussian (MoRe Appendix D).

    Args:
        samples: Values per group (e.g. ``blkdiag1`` pooled over every adapted layer).
        fits: A :class:`moreft.analysis.GaussianFit` per group (``mean``, ``std``, ``excess_kurtosis``, ``ks``).
        path: Where to write the PNG.
        title: Figure title.
        bins: Histogram bins.
    """
    names = list(samples)
    fig, axes = subplots(1, max(1, len(names)), figsize=(5 * max(1, len(names)), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        values = samples[name].detach().double().flatten().cpu()
        fit = fits[name]
        ax.hist(values.numpy(), bins=bins, density=True, color="tab:blue", alpha=0.6, label="weights")
        if fit.std > 0:
            grid = torch.linspace(float(values.min()), float(values.max()), 400, dtype=torch.float64)
            pdf = torch.exp(-0.5 * ((grid - fit.mean) / fit.std) ** 2) / (fit.std * (2 * torch.pi) ** 0.5)
            ax.plot(grid.numpy(), pdf.numpy(), color="tab:orange", label=f"N({fit.mean:.2g}, {fit.std:.2g}²)")
        ax.set_title(
            f"{name}: {fit.count:,} values\nexcess kurtosis {fit.excess_kurtosis:.2f}, KS {fit.ks:.3f}",
            fontsize=9,
        )
        ax.set_xlabel("weight")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    if not names:
        axes[0][0].text(
            0.5, 0.5, "no adapter weights", ha="center", va="center", transform=axes[0][0].transAxes
        )
    # y above 1: the figure title sits over the axes' two-line titles (bbox_inches="tight" keeps it in)
    fig.suptitle(title or "adapter weight distributions", fontsize=10, y=1.04)
    return save_png(fig, path)


def plot_curves(
    panels: Sequence[tuple[str, Mapping[str, Sequence[tuple[float, float]]]]],
    path: Path,
    title: str = "",
    log_y: bool = False,
) -> Path:
    """Several runs' curves side by side: one panel per ``(y label, {run label: [(step, value)]})``.

    Used for the pretraining study's loss curves (MoRA Figure 4): every arm in one plot.
    """
    fig, axes = subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels, strict=False):
        for label, points in series.items():
            if points:
                ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 15 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if any(series.values()):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title or "training curves", fontsize=10)
    return save_png(fig, path)


def plot_grouped_bars(
    groups: Sequence[str], values: Mapping[str, Sequence[float]], path: Path, ylabel: str, title: str = ""
) -> Path:
    """One bar per series in each group (e.g. the count of ΔW's singular values above 0.1 per module
    type and arm: MoRA Figure 5)."""
    fig, ax = subplots(figsize=(max(7.0, 1.2 * len(groups) * max(1, len(values)) / 2), 4.5))
    width = 0.8 / max(1, len(values))
    for i, (label, heights) in enumerate(values.items()):
        ax.bar(
            [g + i * width - 0.4 + width / 2 for g in range(len(groups))], list(heights), width, label=label
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if values:
        ax.legend(fontsize=8)
    ax.set_title(title or ylabel, fontsize=10)
    return save_png(fig, path)
