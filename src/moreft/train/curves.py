"""Evaluation curves of a comparison: each arm's validation metric at every evaluated step, over its seeds.

A final score hides how fast a method learns; MoRA's memorisation claim (its Table 2) is about the
steps it takes. ``compare.md`` therefore shows, when the runs evaluated more than once, the mean
and range over seeds of ``eval_<metric>`` at each evaluated step, read from the runs' own
``metrics.jsonl``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moreft.train.rundir import RunDir
from moreft.train.trainer import read_jsonl

#: At most this many step columns; with more evaluations, evenly spaced ones (the last always kept).
MAX_STEP_COLUMNS = 8


def eval_curve(run_dir: str | Path, metric: str) -> dict[int, float]:
    """``{step: eval_<metric>}`` of one run (the last value logged at a step wins; none if it never evaluated)."""
    key = f"eval_{metric}"
    return {
        int(r["step"]): float(r[key])
        for r in read_jsonl(RunDir(Path(run_dir)).metrics_log)
        if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)
    }


def _columns(steps: Sequence[int], limit: int) -> list[int]:
    if len(steps) <= limit:
        return list(steps)
    picks = {round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)}
    return [steps[i] for i in sorted(picks)]


def curve_lines(rows: Sequence[Mapping[str, Any]], metric: str, limit: int = MAX_STEP_COLUMNS) -> list[str]:
    """A Markdown section: per arm, ``eval_<metric>`` at each evaluated step, mean (min–max) over seeds.

    Args:
        rows: Comparison rows with ``label`` and ``runs`` (run folders, one per seed).
        metric: The task metric.
        limit: Most step columns shown.

    Returns:
        The section's lines; empty when no arm evaluated at two or more steps.
    """
    curves = {r["label"]: [eval_curve(run, metric) for run in r.get("runs", ())] for r in rows}
    steps = sorted({s for per_seed in curves.values() for c in per_seed for s in c})
    if len(steps) < 2:
        return []
    shown = _columns(steps, limit)
    lines = [
        f"## Validation {metric} at each evaluation (mean over seeds, min–max)",
        "",
        "| method | " + " | ".join(f"step {s}" for s in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for label, per_seed in curves.items():
        cells = []
        for s in shown:
            values = [c[s] for c in per_seed if s in c]
            cells.append(
                f"{statistics.fmean(values):.4f} ({min(values):.4f}–{max(values):.4f})" if values else "–"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]
