"""A study plan (``moreft study --plan FILE``): tasks, arms, the per-arm search budget, seeds, and its cost.

A plan is a YAML mapping::

    description: MoRe vs LoRA vs peft peers on movie-review sentiment (CPU)
    name: fidelity-sentiment          # the study folder, <output_dir>/<name>/ (default: the file's stem)
    output_dir: runs                  # default: the tasks' output_dir
    settings: {model: minilm, epochs: 3, ...}      # run settings every task shares (recipe keys)
    tasks:
      sentiment:
        recipe: ../sentiment-more.yaml             # optional, relative to the plan file
        settings: {task: sentiment, eval_fraction: 0.1}
        space: {batch_size: [16]}                  # optional, over the plan's space (lr_by_method merged)
        budget: {seconds_per_step: 0.4}            # optional, over the plan's budget
    arms: [lora:rank=8, more:block_rank=1, full, peft:vera:r=256]
    reference: lora:rank=8            # compared with every other arm (paired bootstrap interval)
    search: {trials: 4, sampler: tpe, pruner: none}   # per arm: the same budget for every arm
    space: {lr: {low: 1e-4, high: 3e-3}, lr_by_method: {more: {low: 3e-4, high: 3e-2}}, batch_size: [32]}
    seeds: 5                          # final runs per arm at its best lr, scored on test
    jobs: 2                           # runs at once (trials of a search, final runs), threads split
    budget:                           # measured cost, for the estimate printed before starting
      seconds_per_step: {default: 0.40, full: 0.55, peft:boft: 1.2}
      seconds_per_eval_example: 0.004
      seconds_per_run: 6              # loading, splitting, saving

Each task's run settings are: the defaults < its recipe < the plan's ``settings`` < the task's
``settings``; ``${VAR}`` placeholders are filled from the environment (``requires`` says what
each is). :func:`estimate` turns the measured cost into seconds per run and per study.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError
from moreft.search.settings import SearchSettings
from moreft.search.space import SearchSpace
from moreft.train.arms import matches, parse_method_spec
from moreft.train.bounded import load_yaml, read_text_file
from moreft.train.choices import TRAIN_METHODS
from moreft.train.config import TrainConfig
from moreft.train.value_checks import check_folder_name

PLAN_KEYS = (
    "description",
    "name",
    "output_dir",
    "requires",
    "settings",
    "tasks",
    "arms",
    "reference",
    "search",
    "space",
    "seeds",
    "jobs",
    "budget",
)
TASK_KEYS = ("recipe", "settings", "space", "budget")
BUDGET_KEYS = ("seconds_per_step", "seconds_per_eval_example", "seconds_per_run", "measured")
#: Search settings a plan may give (the study names each arm's search itself).
SEARCH_KEYS = ("trials", "pruner", "reduction_factor", "min_steps", "sampler", "seed", "timeout")


@dataclass(frozen=True)
class StudyPlan:
    """A checked plan (see the module docstring). ``tasks`` maps a task entry's name to its mapping."""

    path: Path
    name: str
    description: str
    output_dir: str | None
    requires: dict[str, str]
    settings: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    arms: tuple[str, ...]
    reference: str | None
    search: SearchSettings
    space: dict[str, Any]
    seeds: int
    jobs: int = 1
    budget: dict[str, Any] = field(default_factory=dict)

    def selected(self, only: Sequence[str] = (), skip: Sequence[str] = ()) -> tuple[str, ...]:
        """The arms ``only`` selects (all when empty) and ``skip`` does not (by spec, method or peft family).

        Raises:
            ConfigError: A pattern selects no arm.
        """
        for pattern in (*only, *skip):
            if not any(matches(a, pattern) for a in self.arms):
                raise ConfigError(
                    f"arm pattern {pattern!r} matches none of the plan's arms {list(self.arms)}"
                )
        return tuple(
            a
            for a in self.arms
            if (not only or any(matches(a, p) for p in only)) and not any(matches(a, p) for p in skip)
        )

    def task_space(self, task: str) -> dict[str, Any]:
        """The plan's space with the task's own entries over it (``lr_by_method`` merged key by key)."""
        own = self.tasks[task].get("space") or {}
        ranges = {**(self.space.get("lr_by_method") or {}), **(own.get("lr_by_method") or {})}
        return {**self.space, **own, **({"lr_by_method": ranges} if ranges else {})}

    def search_space(self, arm: str, task: str) -> SearchSpace:
        """The space of one arm's search on ``task``: the task's space with that arm alone (``lr_by_method``
        entries of methods this moreft lacks left out: no arm of theirs runs here)."""
        return SearchSpace.from_dict({**_available(self.task_space(task)), "arms": [arm]})

    def task_budget(self, task: str) -> dict[str, Any]:
        """The plan's budget, with the task's own entries over it."""
        return {**self.budget, **(self.tasks[task].get("budget") or {})}


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{what} must be a mapping of name: value, got {type(value).__name__}")
    return dict(value)


def _budget(value: Any, what: str) -> dict[str, Any]:
    budget = _mapping(value, what)
    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise ConfigError(f"{what} has unknown key(s) {unknown}; valid keys are {list(BUDGET_KEYS)}")
    step = budget.get("seconds_per_step")
    steps = step if isinstance(step, Mapping) else ({} if step is None else {"default": step})
    for key, number in [
        *steps.items(),
        *((k, budget[k]) for k in ("seconds_per_eval_example", "seconds_per_run") if k in budget),
    ]:
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < math.inf:
            raise ConfigError(f"{what} {key}={number!r} must be a number of seconds >= 0")
    return budget


def read_plan(path: str | os.PathLike) -> StudyPlan:
    """Read and check a plan file (the run settings themselves are checked by :func:`task_configs`).

    Raises:
        ConfigError: A missing or malformed file, unknown keys, no tasks or arms, repeated arms, bad
            search settings or space, seeds < 1, or a bad budget.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study plan {str(path)!r} does not exist")
    data = _mapping(
        load_yaml(read_text_file(path, "study plan"), f"study plan {str(path)!r}"), "a study plan"
    )
    unknown = sorted(set(data) - set(PLAN_KEYS))
    if unknown:
        raise ConfigError(
            f"study plan {str(path)!r} has unknown key(s) {unknown}; valid keys are {list(PLAN_KEYS)}"
        )
    tasks = _mapping(data.get("tasks"), "tasks")
    if not tasks:
        raise ConfigError(f"study plan {str(path)!r} needs tasks: {{<name>: {{recipe: ..., settings: ...}}}}")
    for name, entry in tasks.items():
        check_folder_name("task name", name)
        entry = tasks[name] = _mapping(entry, f"task {name!r}")
        bad = sorted(set(entry) - set(TASK_KEYS))
        if bad:
            raise ConfigError(f"task {name!r} has unknown key(s) {bad}; valid keys are {list(TASK_KEYS)}")
        entry["settings"] = _mapping(entry.get("settings"), f"task {name!r} settings")
        entry["space"] = _mapping(entry.get("space"), f"task {name!r} space")
        entry["budget"] = _budget(entry.get("budget"), f"task {name!r} budget")
    arms = data.get("arms")
    if not isinstance(arms, list) or not arms or not all(isinstance(a, str) and a.strip() for a in arms):
        raise ConfigError(f"study plan {str(path)!r} needs arms: a list of method specs (e.g. lora:rank=8)")
    if len(set(arms)) != len(arms):
        raise ConfigError(
            f"study plan arms repeat an arm: {sorted(a for a in set(arms) if arms.count(a) > 1)}"
        )
    search = _mapping(data.get("search"), "search")
    bad = sorted(set(search) - set(SEARCH_KEYS))
    if bad:
        raise ConfigError(
            f"study plan search has key(s) {bad} a study sets itself; valid keys are {list(SEARCH_KEYS)}"
        )
    space = _mapping(data.get("space"), "space")
    for own in [space, *(entry["space"] for entry in tasks.values())]:
        _check_space(
            {
                **space,
                **own,
                "lr_by_method": {**(space.get("lr_by_method") or {}), **(own.get("lr_by_method") or {})},
            },
            arms,
        )
    seeds = data.get("seeds", 5)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"study plan seeds={seeds!r} must be an integer >= 1 (final runs per arm)")
    jobs = data.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"study plan jobs={jobs!r} must be an integer >= 1 (runs at once)")
    name = data.get("name") or path.stem
    reference = data.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ConfigError(f"study plan reference={reference!r} must be a method spec, e.g. lora:rank=8")
    return StudyPlan(
        path=path,
        name=check_folder_name("study name", name),
        description=str(data.get("description") or ""),
        output_dir=data.get("output_dir"),
        requires=_mapping(data.get("requires"), "requires"),
        settings=_mapping(data.get("settings"), "settings"),
        tasks=tasks,
        arms=tuple(arms),
        reference=reference,
        search=SearchSettings.from_dict(search),
        space=space,
        seeds=seeds,
        jobs=jobs,
        budget=_budget(data.get("budget"), "budget"),
    )


def _check_space(space: Mapping[str, Any], arms: Sequence[str]) -> None:
    """Check a plan's (or a task's) space: its keys and ranges; ``lr_by_method`` keys name a method of this
    moreft or the method of one of the plan's arms (a method that comes later, e.g. ``full``).

    Raises:
        ConfigError: ``arms`` / ``methods`` given (the plan's arms are searched one by one), or a bad entry.
    """
    if "arms" in space or "methods" in space:
        raise ConfigError(
            "study plan space may not list arms or methods: the plan's arms are searched one by one"
        )
    SearchSpace.from_dict({**_available(space), "methods": ["lora"]})
    families = {family_of_spec(a) for a in arms} | {family_of_spec(a).split(":")[0] for a in arms}
    for key in set(space.get("lr_by_method") or {}) - set(_available(space).get("lr_by_method") or {}):
        if str(key).lower() not in families:
            raise ConfigError(
                f"study plan space lr_by_method key {key!r} is neither a method of this moreft "
                f"({', '.join(TRAIN_METHODS)}) nor the method of one of the plan's arms"
            )


def _available(space: Mapping[str, Any]) -> dict[str, Any]:
    """``space`` without the ``lr_by_method`` entries of methods this moreft lacks (e.g. a later ``full``)."""
    ranges = space.get("lr_by_method")
    if not isinstance(ranges, Mapping):
        return dict(space)
    kept = {
        k: v for k, v in ranges.items() if not isinstance(k, str) or k.split(":")[0].lower() in TRAIN_METHODS
    }
    return {**space, "lr_by_method": kept}


def check_arms(arms: Sequence[str], reference: str | None) -> list[dict[str, Any]]:
    """Parse the arms (and check the reference is one of them) before anything trains.

    Raises:
        ConfigError: A bad spec (e.g. a method this moreft lacks: leave it out with ``--skip-arms``).
    """
    parsed = []
    for arm in arms:
        try:
            parsed.append(parse_method_spec(arm))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (leave an arm out with --skip-arms {arm.split(':')[0]})") from None
    if reference is not None and reference in arms:
        return parsed
    if reference is not None:
        from moreft.train.arms import adapter_part

        wanted = adapter_part(parse_method_spec(reference))
        if not any(adapter_part(p) == wanted for p in parsed):
            raise ConfigError(f"study plan reference {reference!r} is not one of the arms run")
    return parsed


def task_configs(
    plan: StudyPlan,
    env: Mapping[str, str] | None = None,
    output_dir: str | None = None,
    only: Sequence[str] = (),
) -> dict[str, TrainConfig]:
    """Each task's shared run settings (before the arm and its lr), written under the study folder.

    Raises:
        ConfigError: A bad recipe or setting, an unset placeholder, or an unknown task in ``only``.
    """
    from moreft.train.recipes import _check_placeholders, resolve_config

    env = os.environ if env is None else env
    unknown = sorted(set(only) - set(plan.tasks))
    if unknown:
        raise ConfigError(f"--tasks {unknown} are not tasks of the plan; its tasks are {list(plan.tasks)}")
    out = {}
    for name, entry in plan.tasks.items():
        if only and name not in only:
            continue
        settings = {**plan.settings, **entry["settings"]}
        _check_placeholders(settings, plan.requires, f"study plan {str(plan.path)!r} task {name!r}", env)
        recipe = entry.get("recipe")
        recipe_path = (plan.path.parent / recipe) if recipe else None
        base = resolve_config(recipe_path, settings, env=env)
        parent = Path(output_dir or plan.output_dir or base.output_dir) / plan.name / name
        out[name] = base.replace(output_dir=str(parent), progress=False)
    return out


@dataclass(frozen=True)
class RunCost:
    """The estimated cost of one run of a task: steps, evaluations and seconds (by arm family)."""

    train_examples: int
    validation_examples: int
    test_examples: int
    steps: int
    evaluations: int


def run_cost(config: TrainConfig) -> RunCost:
    """Steps and evaluated examples of one run of ``config`` (the data is read to size the splits).

    Raises:
        ConfigError / DataPackageError: The task's data cannot be read.
    """
    from moreft.tasks import get_task

    sizes = (
        get_task(config.task, **config.task_options).load(0, config.max_examples, config.eval_fraction).sizes
    )
    cap = config.eval_examples or 10**12
    per_epoch = math.ceil(math.ceil(sizes["train"] / config.batch_size) / config.grad_accum)
    steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    periodic = steps // config.eval_every if config.eval_every else 0
    # the final validation score is the one logged at the last (or, best_checkpoint, the best) evaluated step
    final = 0 if periodic and (config.best_checkpoint or steps % config.eval_every == 0) else 1
    evaluations = periodic + final
    return RunCost(sizes["train"], min(sizes["validation"], cap), min(sizes["test"], cap), steps, evaluations)


def seconds_per_step(budget: Mapping[str, Any], family: str) -> float | None:
    """The budget's seconds per step of an arm family (``peft:vera``, then ``peft``, then ``default``)."""
    step = budget.get("seconds_per_step")
    if not isinstance(step, Mapping):
        return step
    for key in (family, family.split(":")[0], "default"):
        if key in step:
            return float(step[key])
    return None


def run_seconds(cost: RunCost, budget: Mapping[str, Any], family: str) -> float | None:
    """Estimated seconds of one run: steps x seconds/step + evaluated examples x seconds/example + overhead."""
    step = seconds_per_step(budget, family)
    if step is None:
        return None
    per_example = float(budget.get("seconds_per_eval_example", 0.0))
    examples = cost.evaluations * cost.validation_examples + cost.test_examples
    return cost.steps * step + examples * per_example + float(budget.get("seconds_per_run", 0.0))


def family_of_spec(spec: str) -> str:
    """An arm's family from its text (``peft:vera``, ``more``, ``full``), without parsing it."""
    method, _, rest = spec.strip().lower().partition(":")
    return f"peft:{rest.partition(':')[0]}" if method == "peft" else method
