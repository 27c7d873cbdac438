"""The report of a ``moreft study``: per task ``study.md`` / ``study.json`` / ``study.png``, and the index.

Per task, what the study was built to answer:

* the table: each arm's parameters, learning-rate range and best rate (and whether it lies on the edge
  of its range), test metric mean ± std, paired interval against the reference and verdict, training
  time and peak memory;
* the smallest budget per method family at which it is *not worse* than the reference by more than
  the margin (the whole interval above ``-margin``), and at which it is *within* ``±margin``;
* the equal-size pairs: each arm of another method against the arm of the reference's method with
  (nearly) the same parameter count -- at one budget, which method uses it better;
* ``study.png``: test metric against adapter parameters, the Pareto front and the reference's band.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moreft.safe_write import atomic_write_text
from moreft.search.report import pareto_front
from moreft.search.studyplan import StudyPlan
from moreft.tasks import MetricGoal
from moreft.train.compare_report import delta_text, in_points, reference_row
from moreft.train.config import TrainConfig
from moreft.train.plots import plot_study
from moreft.train.statistics import MARGIN, Interval, verdict

FINAL_DIR = "final"
#: Two arms are of equal size when their parameter counts differ by at most this fraction of the larger.
#: MoRA's square side is sqrt((in + out) * rank) rounded down, and to an even number for its ROTATION
#: operator: mora:rank=1 has 26² = 676 parameters per 384x384 layer to LoRA r=1's 768, 12% fewer (the
#: gap shrinks with the rank: 1% at r=8).
SIZE_TOLERANCE = 0.15
#: Verdicts that count as "not worse than the reference by more than the margin".
NOT_WORSE = ("within", "not worse", "better")


def arm_verdict(row: dict[str, Any]) -> str | None:
    """The row's :func:`~moreft.train.statistics.verdict` from its interval; None without one, and for a
    loss metric (the verdicts are for scores in [0, 1], higher better)."""
    d = row.get("delta")
    usable = d and not row.get("reference") and in_points([row])
    return verdict(Interval(**d)) if usable else None


def smallest_budgets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family (in order of appearance, the reference's excluded): its arms, the fewest parameters at
    which it is not worse than the reference by more than the margin, and at which it is within it."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("reference"):
            continue
        fam = out.setdefault(
            r["family"], {"family": r["family"], "arms": 0, "not_worse": None, "within": None}
        )
        fam["arms"] += 1
        v = arm_verdict(r)
        for key, ok in (("not_worse", v in NOT_WORSE), ("within", v == "within")):
            if ok and (fam[key] is None or r["params"] < fam[key]["params"]):
                fam[key] = r
    return list(out.values())


def equal_size_pairs(
    rows: Sequence[dict[str, Any]], tolerance: float = SIZE_TOLERANCE
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(arm, baseline)`` pairs: each arm of a method other than the reference's, against the arm of the
    reference's method nearest to it in size, where the two parameter counts differ by at most
    ``tolerance`` of the larger. Arms without such a partner, and every arm when no row is the reference,
    have none."""
    ref = reference_row(rows)
    if ref is None:
        return []
    own = [r for r in rows if r["family"] == ref["family"]]

    def gap(a: dict[str, Any], b: dict[str, Any]) -> float:
        return abs(a["params"] - b["params"]) / max(a["params"], b["params"], 1)

    pairs = []
    for r in rows:
        if r["family"] == ref["family"]:
            continue
        nearest = min(own, key=lambda b: gap(r, b))
        if gap(r, nearest) <= tolerance:
            pairs.append((r, nearest))
    return pairs


def _pair_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    paired = [r for r in rows if r.get("same_size")]
    if not paired:
        return []
    lines = [
        f"Equal size: each arm against the arm of the reference's method within {SIZE_TOLERANCE:.0%} of its "
        "parameters (paired bootstrap, as above).",
        "",
        f"| arm | params | against | params | Δ{', pts' if in_points(rows) else ''} [95% CI] | within 0.5 pt? |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in paired:
        p = r["same_size"]
        delta = delta_text(p) if p.get("delta") else f"n/a ({p.get('delta_note')})"
        lines.append(
            f"| {r['arm']} | {r['params']:,} | {p['baseline']} | {p['baseline_params']:,} | {delta} | "
            f"{p.get('verdict') or '–'} |"
        )
    return [*lines, ""]


def _budget_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    ref = reference_row(rows)
    if ref is None:
        return []
    m = f"{MARGIN * 100:g}"

    def cell(r: dict[str, Any] | None) -> str:
        return "none" if r is None else f"{r['arm']} ({r['params']:,}; {r['params'] / ref['params']:.3g}×)"

    lines = [
        f"Smallest budget per method at which it matches {ref['arm']} ({ref['params']:,} parameters): "
        f"*not worse*: the whole 95% interval lies above -{m} pt; *within*: inside ±{m} pt.",
        "",
        "| method | arms | smallest not worse by > 0.5 pt | smallest within ±0.5 pt |",
        "|---|---:|---|---|",
    ]
    for fam in smallest_budgets(rows):
        lines.append(
            f"| {fam['family']} | {fam['arms']} | {cell(fam['not_worse'])} | {cell(fam['within'])} |"
        )
    return lines


def _table(rows: Sequence[dict[str, Any]], metric: str) -> list[str]:
    ref = (reference_row(rows) or rows[0])["arm"]
    unit = ", pts" if in_points(rows) else ""  # a loss: its own units
    lines = [
        f"| arm | adapter params | lr range | best lr (trial: eval {metric}) | lr on the edge? | test {metric} "
        f"(mean ± std) | Δ vs {ref}{unit} [95% CI] | within 0.5 pt? | train s / run | peak RSS MiB |",
        "|---|---:|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        delta = "reference" if r.get("reference") else (delta_text(r) if r.get("delta") else "n/a")
        seconds, peak = r.get("seconds"), r.get("peak_rss_mb")
        lines.append(
            f"| {r['arm']} | {r['params']:,} | [{r['lr_low']:.1e}, {r['lr_high']:.1e}] | {r['best_lr']:.2e} "
            f"({r['best_trial']}: {r['best_eval']:.4f}) | {r['edge'] + ': widen' if r['edge'] else 'no'} | "
            f"{r['mean']:.4f} ± {r['std']:.4f} | {delta} | {'–' if r.get('reference') else r['verdict'] or '–'} | "
            f"{'–' if seconds is None else f'{seconds:.0f}'} | {'–' if peak is None else f'{peak:,.0f}'} |"
        )
    return lines


def front_arms(
    rows: Sequence[dict[str, Any]], goal: MetricGoal = MetricGoal.MAXIMIZE
) -> list[dict[str, Any]]:
    """The arms no other arm beats with fewer (or equal) parameters and a better (or equal) test mean."""
    candidates = [
        {"state": "complete", "value": r["mean"], "params": r["params"], "number": i, "row": r}
        for i, r in enumerate(rows)
    ]
    return [p["row"] for p in pareto_front(candidates, goal)]


def write_task(
    plan: StudyPlan,
    task: str,
    base: TrainConfig,
    rows: Sequence[dict[str, Any]],
    metric: str,
    command: str | None,
    goal: MetricGoal = MetricGoal.MAXIMIZE,
) -> None:
    """Write ``study.md``, ``study.json`` and ``study.png`` of one task into ``base.output_dir``;
    ``goal`` is the metric's direction (the Pareto front of a loss keeps the lowest values)."""
    folder = Path(base.output_dir)
    front = front_arms(rows, goal)
    better = "higher" if goal is MetricGoal.MAXIMIZE else "lower"
    lines = [f"# Study {plan.name}: {task} ({base.model})", "", plan.description, ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Each arm: {plan.search.trials} search trials ({plan.search.sampler.value} sampler, pruner "
        f"{plan.search.pruner.value}, seed {plan.search.seed}) choosing the learning rate on the validation "
        f"split, then {plan.seeds} seeds at its best trial's learning rate scored on the test split "
        f"(`{FINAL_DIR}/compare.md`). Shared settings: epochs={base.epochs:g}, max_steps={base.max_steps}, "
        f"batch_size={base.batch_size}, max_length={base.max_length}, eval_fraction={base.eval_fraction}, "
        f"best_checkpoint={base.best_checkpoint}.",
        "",
        *_table(rows, metric),
        "",
        "*lr on the edge*: the best trial's learning rate lies in the outer 10% of the arm's range (log scale); "
        "the optimum may lie outside it, so the range should be widened. The interval is the paired bootstrap "
        "of `moreft compare` (seeds and test examples resampled jointly). Train s / run: mean training time "
        "of the final runs; peak RSS: the largest peak resident memory of its final runs.",
        "",
        *_budget_lines(rows),
        "",
        *_pair_lines(rows),
        f"Pareto front (no arm has fewer parameters and a {better} test {metric}): "
        + ", ".join(f"{r['arm']} ({r['params']:,}: {r['mean']:.4f})" for r in front)
        + ". Plot: [study.png](study.png).",
        "",
    ]
    atomic_write_text(folder / "study.md", "\n".join(lines))
    atomic_write_text(
        folder / "study.json",
        json.dumps({"task": task, "metric": metric, "rows": list(rows)}, indent=2) + "\n",
    )
    plot_study(
        rows, front, f"test {metric}", folder / "study.png", title=f"{plan.name}: {task} ({base.model})"
    )


def write_index(
    plan: StudyPlan,
    path: Path,
    budget: Sequence[str],
    results: dict[str, list[dict[str, Any]]],
    command: str | None,
) -> None:
    """Write ``<name>/study.md``: the estimated cost (``budget``, lines) and each task's tables."""
    lines = [f"# Study {plan.name}", "", plan.description, ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["## Estimated cost (before running)", "", *budget, ""]
    for task, rows in results.items():
        lines += [
            f"## {task}",
            "",
            f"[{task}/study.md]({task}/study.md)",
            "",
            *_table(rows, rows[0]["metric"]),
            "",
            *_budget_lines(rows),
            "",
            *_pair_lines(rows),
        ]
    atomic_write_text(path / "study.md", "\n".join(lines))
