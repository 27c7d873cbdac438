"""``moreft study``: per task, the same learning-rate search for every arm, then seeds at each arm's best lr.

    moreft study --plan recipes/fidelity/sentiment.yaml --dry-run     # the plan and its estimated cost
    moreft study --plan recipes/fidelity/sentiment.yaml               # run (again: continues)

For each task of the plan (:mod:`moreft.search.studyplan`), in ``<output_dir>/<name>/<task>/``:

1. ``search-<arm>/``: one ``moreft search`` per arm over that arm alone, ``search.trials`` trials each
   (the same budget for every arm), sampling the learning rate in the arm's range (``space.lr``,
   or ``space.lr_by_method``) and scored on the validation split;
2. ``final/``: ``moreft compare`` of every arm at its best trial's learning rate (and batch size),
   ``seeds`` seeds each, scored on the test split, with the paired bootstrap interval of each arm
   against the plan's ``reference``;
3. ``study.md`` / ``study.json``: per arm its parameters, lr range, best lr (and whether it lies on the
   edge of its range), test metric mean ± std, interval and verdict; ``<name>/study.md`` lists the tasks.

Running the same command again skips what is done: a search resumes from its SQLite study (only the
missing trials run), a finished final run is reused, and one interrupted after a checkpoint
(``save_every``) resumes. The estimated cost (runs x seconds per run from the plan's measured
seconds per step) is printed before anything trains, and progress with an estimate of the time left
(from the runs trained so far) after each search and run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError
from moreft.search.study_report import FINAL_DIR, equal_size_pairs, write_index, write_task
from moreft.search.studyplan import StudyPlan, check_arms, family_of_spec, run_cost, run_seconds
from moreft.train.arms import slug, with_settings
from moreft.train.config import TrainConfig


def estimate(plan: StudyPlan, configs: dict[str, TrainConfig], arms: Sequence[str]) -> list[dict[str, Any]]:
    """Per task: examples, steps per run, runs (arms x (trials + seeds)) and estimated seconds (None when the
    budget has no seconds per step, or the data cannot be read here)."""
    rows = []
    for task, base in configs.items():
        budget = plan.task_budget(task)
        try:
            cost = run_cost(base)
        except (ConfigError, OSError, ValueError) as exc:
            rows.append(
                {
                    "task": task,
                    "runs": len(arms) * (plan.search.trials + plan.seeds),
                    "seconds": None,
                    "note": f"cannot size the data here: {str(exc)[:120]}",
                }
            )
            continue
        per_arm = {arm: run_seconds(cost, budget, family_of_spec(arm)) for arm in arms}
        known = all(s is not None for s in per_arm.values())
        # jobs runs at a time: a search's trials, and the final runs, share the CPU cores
        total = (
            sum((plan.search.trials + plan.seeds) * s for s in per_arm.values()) / plan.jobs
            if known
            else None
        )
        rows.append(
            {
                "task": task,
                "model": base.model,
                "train": cost.train_examples,
                "validation": cost.validation_examples,
                "test": cost.test_examples,
                "steps": cost.steps,
                "evaluations": cost.evaluations,
                "runs": len(arms) * (plan.search.trials + plan.seeds),
                "seconds": total,
                "per_arm": per_arm,
                "note": None if known else "the plan's budget has no seconds_per_step for every arm",
            }
        )
    return rows


def budget_lines(plan: StudyPlan, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The estimate as a Markdown table with a total."""
    lines = [
        "| task | train / validation / test examples | steps per run | evaluations per run | runs | "
        "estimated hours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "steps" not in r:
            lines.append(f"| {r['task']} | – | – | – | {r['runs']} | – ({r['note']}) |")
            continue
        hours = "–" if r["seconds"] is None else f"{r['seconds'] / 3600:.2f}"
        lines.append(
            f"| {r['task']} | {r['train']:,} / {r['validation']:,} / {r['test']:,} | {r['steps']:,} | "
            f"{r['evaluations']} | {r['runs']} | {hours} |"
        )
    known = [r["seconds"] for r in rows if r.get("seconds") is not None]
    total = (
        "–"
        if not known
        else f"{sum(known) / 3600:.2f}" + ("" if len(known) == len(rows) else " (known tasks only)")
    )
    lines.append(f"| **all** | | | | **{sum(r['runs'] for r in rows)}** | **{total}** |")
    measured = plan.budget.get("measured")
    lines += [
        "",
        f"Runs: arms x ({plan.search.trials} search trials + {plan.seeds} seeds), {plan.jobs} at a time. "
        "Seconds per run: steps x seconds per step + evaluated examples x seconds per example + overhead, "
        "from the plan's budget" + (f" ({measured})" if measured else "") + "; hours: their sum / jobs.",
    ]
    return lines


class Progress:
    """Counts runs done (trained now or found done) and estimates the time left from this session's pace
    (wall time per run trained in it)."""

    def __init__(self, total: int, say: Callable[[str], None]) -> None:
        self.total, self.say, self.done, self.trained = total, say, 0, 0
        self.start = time.perf_counter()

    def add(self, runs: int, trained: int) -> None:
        self.done += runs
        self.trained += trained

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        eta = (
            f", about {left * elapsed / self.trained / 3600:.2f} h left" if self.trained and left > 0 else ""
        )
        return f"study: {self.done}/{self.total} runs done ({elapsed / 3600:.2f} h this session{eta})"


@dataclass(frozen=True)
class StudyResult:
    """What :func:`run_study` produced: the study folder and, per task, one row per arm."""

    path: Path
    tasks: dict[str, list[dict[str, Any]]]


def run_study(
    plan: StudyPlan,
    configs: dict[str, TrainConfig],
    arms: Sequence[str],
    dry_run: bool = False,
    say: Callable[[str], None] = print,
    train_fn: Callable[[TrainConfig], Any] | None = None,
    command: str | None = None,
) -> StudyResult:
    """Run (or continue) the study; see the module docstring.

    Args:
        plan: The plan.
        configs: Each task's shared settings (:func:`moreft.search.studyplan.task_configs`).
        arms: The arms to run (the plan's, or a selection of them).
        dry_run: Print the plan's arms and estimated cost, and stop.
        say: Where progress lines go.
        train_fn: Trains one final run (default: :func:`moreft.train.train`, quietly); for tests.
        command: The command line, shown in the reports.

    Raises:
        ConfigError: A bad arm or reference, or a search with no complete trial for an arm.
    """
    check_arms(arms, plan.reference)
    rows = estimate(plan, configs, arms)
    path = Path(next(iter(configs.values())).output_dir).parent
    say(
        f"study {plan.name}: {len(configs)} task(s) x {len(arms)} arms, {plan.search.trials} trials per arm, "
        f"{plan.seeds} seeds; in {path}"
    )
    say("\n".join(budget_lines(plan, rows)))
    if dry_run:
        return StudyResult(path, {})
    from moreft.train.loop import train

    def quietly(config: TrainConfig) -> Any:
        return train(config, quiet=True)

    progress = Progress(sum(r["runs"] for r in rows), say)
    results = {}
    for task, base in configs.items():
        results[task] = _task(
            plan, task, base, arms, progress, train_fn or (quietly if plan.jobs == 1 else None), command
        )
    write_index(plan, path, budget_lines(plan, rows), results, command)
    say(f"wrote {path / 'study.md'}")
    return StudyResult(path, results)


def _searched_before(folder: Path) -> int:
    try:
        return len(json.loads((folder / "search.json").read_text())["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _task(
    plan: StudyPlan,
    task: str,
    base: TrainConfig,
    arms: Sequence[str],
    progress: Progress,
    train_fn: Callable[[TrainConfig], Any] | None,
    command: str | None,
) -> list[dict[str, Any]]:
    """One task: a search per arm, the final comparison, the task's report; its rows per arm."""
    from moreft.search import SearchSettings, run_search
    from moreft.search.report import lr_edges
    from moreft.search.settings import StudyMismatchError
    from moreft.tasks import get_task
    from moreft.train.arms import parse_method_spec
    from moreft.train.comparison import compare, paired_delta

    goal = get_task(base.task, **base.task_options).metric_goal
    say = progress.say
    rows = []
    for i, arm in enumerate(arms, start=1):
        space = plan.search_space(arm, task)
        settings = SearchSettings(
            **{**plan.search.to_dict(), "jobs": plan.jobs, "name": f"search-{slug(parse_method_spec(arm))}"}
        )
        folder = Path(base.output_dir) / str(settings.name)
        family = family_of_spec(arm)
        lr = space.lr_for(family)
        say(
            f"[{task}] search {i}/{len(arms)} {arm}: {settings.trials} trials, lr in [{lr.low:.1e}, {lr.high:.1e}]"
        )
        before = _searched_before(folder)
        try:
            result = run_search(base, space, settings, command=command, quiet=True)
        except StudyMismatchError as err:
            raise StudyMismatchError(
                f"[{task}] the search of {arm}: {err}. To search this arm again under the plan's settings, "
                f"move {folder} aside (the other arms' searches are kept)"
            ) from err
        counted = sum(r["state"] in ("complete", "pruned") for r in result.rows)
        progress.add(settings.trials, max(0, counted - before))
        done = [r for r in result.rows if r["state"] == "complete"]
        if not done:
            raise ConfigError(
                f"[{task}] the search of {arm} has no complete trial (see {folder / 'search.md'}); "
                "fix the arm or leave it out with --skip-arms"
            )
        best = max(done, key=lambda r: (goal.score(r["value"]), -r["number"]))
        edge = next(e for e in lr_edges(result.rows, space, goal=goal) if e["family"] == family)
        rows.append(
            {
                "arm": arm,
                "family": family,
                "params": best["params"],
                "lr_low": lr.low,
                "lr_high": lr.high,
                "best_trial": best["number"],
                "best_lr": best["lr"],
                "best_batch_size": best["batch_size"],
                "best_eval": best["value"],
                "edge": edge["edge"],
                "edge_warning": edge["warning"],
                "search": str(folder),
            }
        )
        say(
            f"[{task}] {arm}: best lr {best['lr']:.2e} (trial {best['number']}, eval {best['value']:.4f})"
            + (f"; {edge['warning']}" if edge["warning"] else "")
            + f"\n{progress.line()}"
        )
    finals = [with_settings(r["arm"], lr=r["best_lr"], batch_size=r["best_batch_size"]) for r in rows]
    count = [0]

    def trained(config: TrainConfig, metrics: dict[str, Any], seconds: float) -> None:
        count[0] += 1
        progress.add(1, 1)
        say(progress.line())

    comparison = compare(
        base,
        finals,
        plan.seeds,
        output_dir=base.output_dir,
        name=FINAL_DIR,
        run=train_fn,
        command=command,
        reference=plan.reference,
        log=lambda line: say(f"[{task}] {line}"),
        jobs=plan.jobs,
        on_run=trained,
    )
    progress.add(len(finals) * plan.seeds - count[0], 0)  # the runs found finished
    say(f"[{task}] final runs done: {Path(base.output_dir) / FINAL_DIR / 'compare.md'}\n{progress.line()}")
    for row, final in zip(rows, comparison.rows, strict=True):
        row.update(
            {
                k: final[k]
                for k in (
                    "mean",
                    "std",
                    "values",
                    "seconds",
                    "peak_rss_mb",
                    "reference",
                    "delta",
                    "delta_in_points",
                    "verdict",
                    "delta_note",
                )
                if k in final  # absent (a row without an interval): the report's defaults apply
            }
        )
        row["metric"] = comparison.metric
        row["run_dirs"] = dict(zip(final["seeds"], final["runs"], strict=True))
    for arm, baseline in equal_size_pairs(rows):
        arm["same_size"] = {
            "baseline": baseline["arm"],
            "baseline_params": baseline["params"],
            **paired_delta(base, arm["run_dirs"], baseline["run_dirs"], comparison.metric),
        }
    write_task(plan, task, base, rows, comparison.metric, command, goal)
    return rows
