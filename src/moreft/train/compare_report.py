"""``compare.md``, ``compare.json`` and ``compare.png``: the report of a :func:`moreft.train.compare`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moreft.safe_write import atomic_write_text
from moreft.train.config import TrainConfig
from moreft.train.curves import curve_lines
from moreft.train.plots import plot_compare
from moreft.train.statistics import RESAMPLES, signed


def in_points(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the rows' differences are in points (× 100, a score); False for a loss metric's rows."""
    return all(r.get("delta_in_points", True) for r in rows)


def reference_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row marked as the reference (``"reference": True``), or None."""
    return next((r for r in rows if r.get("reference")), None)


def delta_text(row: Mapping[str, Any]) -> str:
    """A row's difference to the reference with its interval, ``+0.42 [-0.10, +0.95]``, in its units."""
    d, p = row["delta"], row.get("delta_in_points", True)
    return f"{signed(d['estimate'], p)} [{signed(d['low'], p)}, {signed(d['high'], p)}]"


def _mib(value: float | None) -> str:
    """A run's peak resident memory, or "–" when its metrics predate the measurement."""
    return "–" if value is None else f"{value:,.0f}"


def write_report(
    path: Path, rows: Sequence[dict[str, Any]], metric: str, base: TrainConfig, command: str | None = None
) -> None:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` into ``path``.

    Args:
        path: The comparison directory.
        rows: As in :attr:`CompareResult.rows` (``reference``, ``delta``, ``verdict`` optional).
        metric: The task metric compared.
        base: The shared settings (shown in the heading).
        command: The command line that made the comparison, shown first when given.
    """
    steps = f"max_steps={base.max_steps}" if base.max_steps else f"epochs={base.epochs:g}"
    seeds = rows[0]["seeds"] if rows else []
    ref = reference_row(rows) or (rows[0] if rows else None)
    ref_label = ref["label"] if ref else "-"
    points = in_points(rows)
    lines = [f"# {base.task}: {metric} by method ({base.model}, {len(seeds)} seeds)", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Shared settings: {steps}, batch_size={base.batch_size}, lr={base.lr:g} ({base.lr_scheduler}), "
        f"max_examples={base.max_examples}, eval_examples={base.eval_examples}, seeds {seeds}.",
        "",
        f"| method | trainable params | params / {ref_label} | test {metric} (mean ± std) | "
        f"Δ vs {ref_label}{', pts' if points else ''} [95% CI] | within 0.5 pt? | eval {metric} (mean ± std) | test {metric} per seed "
        "| train s / run | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    notes: dict[str, list[str]] = {}  # why there is no interval: the arms it applies to
    for r in rows:
        per_seed = ", ".join(f"{v:.3f}" for v in r["values"])
        d = r.get("delta")
        if r.get("reference"):
            delta, said = "reference", "–"
        elif d:
            delta, said = delta_text(r), r["verdict"]
        else:
            delta, said = "n/a", "–"
            if r.get("delta_note"):
                notes.setdefault(r["delta_note"], []).append(r["label"])
        lines.append(
            f"| {r['label']} | {r['params']:,} | {r['params'] / ref['params']:.2f} | "
            f"{r['mean']:.4f} ± {r['std']:.4f} | {delta} | {said} | {r['eval_mean']:.4f} ± {r['eval_std']:.4f} "
            f"| {per_seed} | {r['seconds']:.1f} | {_mib(r.get('peak_rss_mb'))} |"
        )
    tuned = [
        f"{r['label']} ({', '.join(f'{k}={v}' for k, v in r['overrides'].items())})"
        for r in rows
        if r.get("overrides")
    ]
    settings = (
        "Every method uses the same shared settings (no per-method tuning)."
        if not tuned
        else "These methods override shared settings: " + "; ".join(tuned) + "."
    )
    lines += [
        "",
        "Trainable params count adapter parameters only (a classification head, trained in full, "
        "is excluded). std is the sample standard deviation over seeds; each seed also draws its own "
        f"data split. {settings} Train s / run: mean training time; peak RSS: the largest of the runs' "
        "peak resident memory (the whole process: model, data, optimizer).",
        "",
        f"Δ: the test {metric} minus the reference's ({ref_label}), "
        + ("in points (× 100)" if points else "in the metric's own units (a loss: lower is better)")
        + f", averaged over the seeds; the interval is a paired bootstrap ({RESAMPLES:,} resamples of seeds "
        "and, within each, test examples, the same draws for both arms; fixed seed). "
        + (
            "*within 0.5 pt*: the whole interval lies inside ±0.5 points of the reference."
            if points
            else "A loss gets no ±0.5-point verdict."
        ),
        "",
    ]
    if notes:
        lines += [
            "Notes:",
            "",
            *(f"- {', '.join(arms)}: no interval ({why})" for why, arms in notes.items()),
            "",
        ]
    lines += curve_lines(rows, metric)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "compare.md", "\n".join(lines))
    atomic_write_text(
        path / "compare.json",
        json.dumps({"metric": metric, "command": command, "rows": list(rows)}, indent=2) + "\n",
    )
    plot_compare(rows, f"test {metric}", path / "compare.png", title=f"{base.task} ({base.model}, {steps})")
