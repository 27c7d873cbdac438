"""A search's report: ``search.md``, ``search.json``, ``search.png``, and the best config as ``best.yaml``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from moreft.safe_write import atomic_write_text
from moreft.search.settings import INTERRUPTED, RETRY_OF, Candidate, SearchSettings
from moreft.search.space import ON, SearchSpace, family_of
from moreft.tasks import MetricGoal
from moreft.train.config import TrainConfig
from moreft.train.plots import draw_pareto_front, save_png, subplots
from moreft.train.recipes import dump_config

BEST_TRIALS_SHOWN = 5
_METHOD_COLOURS = {"more": "tab:blue", "lora": "tab:orange", "mora": "tab:green"}
_OTHER_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "tab:red")
#: A method's best learning rate this close to an end of its range (a share of the range, log scale) is
#: reported as lying on the edge: the optimum may lie outside, so the range should be widened.
EDGE_SHARE = 0.1


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per trial: ``number``, ``state`` (complete / pruned / fail / running), ``method``,
    ``label`` (the architecture), ``target_modules``, ``params``, ``value`` (final or last reported
    eval metric), ``test``, ``step``, ``lr``, ``batch_size``, ``seconds``, ``note``.
    """
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        state = t.state.name.lower()
        value = (
            t.value
            if t.state is optuna.trial.TrialState.COMPLETE
            else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        )
        step = a.get("config", {}).get("max_steps") if state == "complete" else a.get("last_step")
        label, _, targets = str(t.params.get("architecture", "?")).partition(ON)
        notes = [
            f"retry of trial {a[RETRY_OF]}" if RETRY_OF in a else "",
            "interrupted" if a.get(INTERRUPTED) else "",
        ]
        rows.append(
            {
                "number": t.number,
                "state": state,
                "method": label.split(":")[0],
                "family": family_of(label),
                "label": label,
                "target_modules": targets,
                "params": a.get("params"),
                "value": value,
                "test": a.get("test"),
                "step": step,
                "lr": t.params.get("lr"),
                "batch_size": t.params.get("batch_size"),
                "seconds": a.get("seconds"),
                "note": "; ".join(n for n in notes if n),
            }
        )
    return rows


def pareto_front(
    rows: Sequence[dict[str, Any]], goal: MetricGoal = MetricGoal.MAXIMIZE
) -> list[dict[str, Any]]:
    """Complete trials not beaten by another with fewer (or equal) parameters and a better (or equal)
    metric (higher, or lower when ``goal`` is MINIMIZE); sorted by parameters. Ties in both keep the
    earliest trial.
    """
    done = sorted(
        (r for r in rows if r["state"] == "complete"),
        key=lambda r: (r["params"], -goal.score(r["value"]), r["number"]),
    )
    front: list[dict[str, Any]] = []
    for r in done:
        if not front or goal.score(r["value"]) > goal.score(front[-1]["value"]):
            front.append(r)
    return front


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _table(rows: Sequence[dict[str, Any]], metric: str) -> list[str]:
    lines = [
        f"| trial | method | targets | lr | batch | adapter params | eval {metric} | test {metric} "
        "| steps | s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['number']} | {r['label']} | {r['target_modules']} | {_fmt(r['lr'], '.2e')} | "
            f"{r['batch_size']} | {_fmt(r['params'], ',')} | {_fmt(r['value'])} | {_fmt(r['test'])} | "
            f"{_fmt(r['step'], 'd')} | {_fmt(r['seconds'], '.0f')} |"
        )
    return lines


def plot_search(
    rows: Sequence[dict[str, Any]],
    front: Sequence[dict[str, Any]],
    metric: str,
    path: Path,
    title: str = "",
    goal: MetricGoal = MetricGoal.MAXIMIZE,
) -> Path:
    """Every trained trial as a point (metric vs adapter params, log x); pruned trials grey at their
    last reported value; the Pareto front as a step line."""
    fig, ax = subplots(figsize=(7, 4.5))
    for r in rows:
        if r["state"] == "pruned" and r["value"] is not None:
            ax.scatter(r["params"], r["value"], marker="x", color="0.65", zorder=2)
    families = sorted({r.get("family", r["method"]) for r in rows if r["state"] == "complete"})
    others = [f for f in families if f not in _METHOD_COLOURS]
    colours = {
        **_METHOD_COLOURS,
        **{f: _OTHER_COLOURS[i % len(_OTHER_COLOURS)] for i, f in enumerate(others)},
    }
    for method in families:
        colour = colours[method]
        done = [r for r in rows if r["state"] == "complete" and r.get("family", r["method"]) == method]
        if done:
            ax.scatter(
                [r["params"] for r in done], [r["value"] for r in done], color=colour, label=method, zorder=3
            )
    draw_pareto_front(ax, front, value="value")
    ax.scatter([], [], marker="x", color="0.65", label="pruned (last eval)")
    for r in rows:
        if r["state"] in ("complete", "pruned") and r["value"] is not None:
            ax.annotate(
                str(r["number"]),
                (r["params"], r["value"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color="0.3",
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters")
    ax.set_ylabel(f"eval {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if goal is MetricGoal.MAXIMIZE else "upper right")
    return save_png(fig, path)


def lr_edges(
    rows: Sequence[dict[str, Any]],
    space: SearchSpace,
    share: float = EDGE_SHARE,
    goal: MetricGoal = MetricGoal.MAXIMIZE,
) -> list[dict[str, Any]]:
    """Per method family (``more``, ``peft:vera``, ...), its best complete trial's learning rate against the
    family's range: ``family``, ``low``, ``high``, ``log``, ``best_trial``, ``best_lr``, ``position`` (0 at low,
    1 at high), ``edge`` (``"low"``, ``"high"`` or None) and ``warning`` (None, or "widen the range ...")."""
    out = []
    for family in dict.fromkeys(
        r.get("family") or family_of(r["label"]) for r in rows if r["state"] == "complete"
    ):
        done = [
            r
            for r in rows
            if r["state"] == "complete" and (r.get("family") or family_of(r["label"])) == family
        ]
        best = max(done, key=lambda r: (goal.score(r["value"]), -r["number"]))
        rng = space.lr_for(family)
        position = rng.position(best["lr"])
        edge = "low" if position <= share else "high" if position >= 1 - share else None
        warning = (
            None
            if edge is None
            else (
                f"best lr {best['lr']:.2e} lies in the {'lowest' if edge == 'low' else 'highest'} {share:.0%} of the "
                f"range [{rng.low:.2e}, {rng.high:.2e}]: widen the range {'below' if edge == 'low' else 'above'} it"
            )
        )
        out.append(
            {
                "family": family,
                "low": rng.low,
                "high": rng.high,
                "log": rng.log,
                "best_trial": best["number"],
                "best_lr": best["lr"],
                "value": best["value"],
                "position": round(position, 4),
                "edge": edge,
                "warning": warning,
            }
        )
    return out


def write_best_recipe(path: Path, config: TrainConfig, row: dict[str, Any], metric: str) -> Path:
    """``best.yaml``: the best trial's config as a ``moreft train --config`` recipe."""
    recipe = config.replace(
        run_name="search-best", output_dir="runs", overwrite=False, resume=False, progress=True
    )
    head = {
        "description": f"best of search {path.name}: trial {row['number']}, {row['label']}, "
        f"eval {metric} {row['value']:.4f} with {row['params']:,} adapter params"
    }
    text = yaml.safe_dump(head, sort_keys=False, width=200) + dump_config(recipe)
    atomic_write_text(path / "best.yaml", text)
    return path / "best.yaml"


def write_report(
    path: Path,
    study: optuna.Study,
    base: TrainConfig,
    space: SearchSpace,
    settings: SearchSettings,
    found: Sequence[Candidate],
    command: str | None = None,
    wall_seconds: float | None = None,
) -> tuple[list[dict], TrainConfig | None]:
    """Write ``search.md``, ``search.json``, ``search.png`` and (if a trial completed) ``best.yaml``.

    Returns:
        ``(rows, best config or None)``.
    """
    from moreft.tasks import get_task

    task = get_task(base.task, **base.task_options)
    metric, goal = task.metric_name, task.metric_goal
    rows = trial_rows(study)
    front = pareto_front(rows, goal)
    done = sorted(
        (r for r in rows if r["state"] == "complete"), key=lambda r: (-goal.score(r["value"]), r["params"])
    )
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    excluded = [c for c in found if c.excluded]
    best = None
    lines = [
        f"# Search: {base.task} × {Path(base.model).name} — eval {metric} vs trainable adapter parameters",
        "",
    ]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
        f"Sampler {settings.sampler.value} (seed {settings.seed}), pruner {settings.pruner.value} "
        f"(first rung {settings.min_steps or base.eval_every} steps, "
        f"reduction factor {settings.reduction_factor})"
        + (
            f", parameter budget {settings.max_params:,} ({len(excluded)} of {len(found)} architectures "
            "excluded before training)"
            if settings.max_params
            else ""
        )
        + (f", {settings.jobs} parallel workers" if settings.jobs > 1 else "")
        + (f"; wall time {wall_seconds / 60:.1f} min" if wall_seconds is not None else "")
        + f", {sum(r['seconds'] or 0 for r in rows) / 60:.1f} min in trials (all sessions)"
        + ".",
        "",
        f"Every trial: {base.model}, `max_steps={base.max_steps}`, `eval_every={base.eval_every}`, "
        f"{base.eval_examples or 'all'} validation examples scored, seed {base.seed}. The search "
        f"{'maximises' if goal is MetricGoal.MAXIMIZE else 'minimises'} the validation {metric}; "
        f"test {metric} is only reported. "
        f"Space: `{json.dumps(space.to_dict())}`.",
        "",
    ]
    edges = lr_edges(rows, space, goal=goal)
    if done:
        best_row = done[0]
        best = TrainConfig.from_dict(study.trials[best_row["number"]].user_attrs["config"])
        recipe = write_best_recipe(path, best, best_row, metric)
        lines += [
            f"## Best trials (by eval {metric})",
            "",
            *_table(done[:BEST_TRIALS_SHOWN], metric),
            "",
            f"Best config: `{recipe.name}` — `moreft train --config {recipe}`",
            "",
            f"## Pareto front (eval {metric} vs adapter params)",
            "",
            *_table(front, metric),
            "",
        ]
    if edges:
        lines += [
            f"## Learning rate against its range (best eval {metric} per method)",
            "",
            "| method | lr range | best trial | best lr | position in range | |",
            "|---|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| {e['family']} | [{e['low']:.2e}, {e['high']:.2e}]{' log' if e['log'] else ''} | {e['best_trial']} "
            f"| {e['best_lr']:.2e} | {e['position']:.2f} | {'**widen the range**: ' + e['warning'] if e['warning'] else 'inside'} |"
            for e in edges
        ]
        lines += [
            "",
            f"Position 0 is the low end, 1 the high end (log scale); a best value in the outer "
            f"{EDGE_SHARE:.0%} at either end suggests the optimum may lie outside the range.",
            "",
        ]
    lines += [
        "## All trials",
        "",
        "| trial | state | method | adapter params | eval (last) | step | note |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['number']} | {r['state']} | {r['label']} | {_fmt(r['params'], ',')} | "
            f"{_fmt(r['value'])} | "
            f"{_fmt(r['step'], 'd')} | {r['note']} |"
        )
    if excluded:
        lines += [
            "",
            "## Architectures excluded before training",
            "",
            "| architecture | adapter params | why |",
            "|---|---:|---|",
        ]
        lines += [f"| {c.key} | {_fmt(c.params, ',')} | {c.excluded} |" for c in excluded]
    lines += ["", "![search](search.png)", ""]
    atomic_write_text(path / "search.md", "\n".join(lines))
    atomic_write_text(
        path / "search.json",
        json.dumps(
            {
                "metric": metric,
                "settings": settings.to_dict(),
                "space": space.to_dict(),
                "rows": rows,
                "front": [r["number"] for r in front],
                "lr_edges": edges,
                "architectures": [{"key": c.key, "params": c.params, "excluded": c.excluded} for c in found],
            },
            indent=2,
        )
        + "\n",
    )
    plot_search(
        rows,
        front,
        metric,
        path / "search.png",
        title=f"{path.name}: {base.task} × {Path(base.model).name}",
        goal=goal,
    )
    return rows, best
