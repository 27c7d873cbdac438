"""Comparing methods on one task over seeds: ``compare.md`` (table) and ``compare.png`` (metric vs params).

    from moreft.train import compare, resolve_config
    base = resolve_config(None, {"task": "sentiment", "model": "minilm", "max_steps": 100})
    result = compare(base, ["lora:rank=8", "more:block_rank=1", "more:block_rank=4", "mora:rank=8"], seeds=3)

Each method x seed is an ordinary run in ``<output_dir>/<name>/runs/``; a run that already
finished with the same config is reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moreft.errors import ConfigError
from moreft.train.arms import adapter_part, arm_changes, canonical, overrides, parse_method_spec, slug
from moreft.train.compare_report import write_report
from moreft.train.config import ADAPTER_SETTINGS, RESUMABLE_CHANGES, TrainConfig
from moreft.train.loop import RunResult, train
from moreft.train.predictions import read_predictions
from moreft.train.rundir import RunDir, read_run_config
from moreft.train.statistics import mean_std, paired_bootstrap, verdict_text
from moreft.train.value_checks import MAX_SEED, check_folder_name

#: Seeds one comparison may train (each trains every method once).
MAX_SEEDS = 1000
#: The reference arm when none is named and it is among the arms (else the first arm).
DEFAULT_REFERENCE = "lora:rank=8"
#: Spec keys that choose the adapter (the adapter settings); any other key in a spec overrides a shared
#: training setting.
_ADAPTER_KEYS = ADAPTER_SETTINGS


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` produced.

    Attributes:
        path: The comparison directory (``compare.md``, ``compare.png``, ``compare.json``, ``runs/``).
        rows: Per method: ``label``, ``params``, ``mean``, ``std``, ``eval_mean``, ``eval_std``,
            ``values``, ``seconds``, ``runs``.
        metric: The task metric compared (test split).
    """

    path: Path
    rows: list[dict[str, Any]]
    metric: str


def _finished(config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of an identical, finished run, or None."""
    run = RunDir(config.run_dir)
    try:
        saved = read_run_config(run.path).to_dict()
    except ConfigError:
        return None
    same = all(saved.get(k) == v for k, v in config.to_dict().items() if k not in _BOOKKEEPING)
    if same and run.metrics.is_file() and run.finished():
        return json.loads(run.metrics.read_text())
    return None


#: Settings a finished run may have been saved with differently (a resumed run saves resume=True).
_BOOKKEEPING = ("resume", "overwrite", "progress")


def _continued(config: TrainConfig) -> TrainConfig:
    """``config`` with ``resume`` when its run was interrupted after a checkpoint with the same settings."""
    run = RunDir(config.run_dir)
    if run.last_checkpoint() is None:
        return config
    try:
        saved = read_run_config(run.path).to_dict()
    except ConfigError:
        return config
    now = config.to_dict()
    if any(saved.get(k) != v for k, v in now.items() if k not in RESUMABLE_CHANGES):
        return config
    return config.replace(resume=True, overwrite=False)


def reference_index(specs: Sequence[Mapping[str, Any]], reference: str | None) -> int:
    """The first arm that ``reference`` (a method spec) names: the same adapter settings, and the same
    value of each shared setting the reference spec overrides (``more:block_rank=4,lr=8e-3`` picks that
    arm's lr-8e-3 run; ``lora:rank=8`` any LoRA r=8 arm, e.g. one at a study's tuned lr). Without a
    reference, the :data:`DEFAULT_REFERENCE` arm if present, else the first.

    Raises:
        ConfigError: ``reference`` names none of the arms.
    """
    wanted = canonical(parse_method_spec(reference or DEFAULT_REFERENCE))
    for i, spec in enumerate(map(canonical, specs)):
        if adapter_part(spec) == adapter_part(wanted) and all(
            k in spec and spec[k] == v for k, v in overrides(wanted).items()
        ):
            return i
    if reference is None:
        return 0
    raise ConfigError(
        f"reference {reference!r} is not one of the arms; give one of them (same method, adapter "
        "settings and any setting it overrides), e.g. the first"
    )


#: Why a language-modelling comparison has no paired interval.
NO_PAIRS_LM = "a language-modelling run scores held-out token blocks, not per-example predictions"


def paired_delta(
    base: TrainConfig, arm: Mapping[int, str | Path], reference: Mapping[int, str | Path], metric: str
) -> dict[str, Any]:
    """The paired bootstrap interval of one arm against another on ``base``'s task, or why there is none.

    Args:
        base: Settings naming the task (``task``, ``task_options``) both arms ran on.
        arm: Per seed, the run folder of the arm (its ``test_predictions.jsonl`` is read).
        reference: The same for the arm it is compared with.
        metric: The task metric.

    Returns:
        ``delta`` (the interval as a dict, or None), ``verdict`` (None without an interval, "–" for a loss),
        ``delta_note`` (why there is no interval, else None) and ``delta_in_points`` (whether the difference
        is a score's, in points; False for a loss).
    """
    from moreft.tasks import MetricGoal, TaskKind, get_task

    task = get_task(base.task, **base.task_options)
    score = task.metric_goal is MetricGoal.MAXIMIZE
    if task.kind is TaskKind.LANGUAGE_MODELING:
        return {"delta": None, "verdict": None, "delta_note": NO_PAIRS_LM, "delta_in_points": score}
    try:
        mine = {seed: read_predictions(RunDir(Path(run)).test_predictions) for seed, run in arm.items()}
        theirs = {
            seed: read_predictions(RunDir(Path(run)).test_predictions) for seed, run in reference.items()
        }
        interval = paired_bootstrap(mine, theirs, metric)
    except ConfigError as exc:
        return {"delta": None, "verdict": None, "delta_note": str(exc), "delta_in_points": score}
    said = verdict_text(interval) if score else "–"  # a loss: no points, no ±0.5-point verdict
    return {"delta": interval.to_dict(), "verdict": said, "delta_note": None, "delta_in_points": score}


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    seeds: int | Sequence[int] = 3,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    run: Callable[[TrainConfig], RunResult] | None = None,
    command: str | None = None,
    reference: str | None = None,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
    on_run: Callable[[TrainConfig, dict[str, Any], float], None] | None = None,
) -> CompareResult:
    """Train every method spec with every seed on ``base``'s task and summarise.

    Args:
        base: Shared settings (task, model, steps, lr, ...); ``method`` and its hyperparameters
            come from each spec.
        methods: Specs such as ``"lora:rank=8"`` or ``"peft:vera:r=256"`` (:func:`parse_method_spec`).
        seeds: A count ``n`` (seeds ``0..n-1``) or explicit seeds.
        output_dir: Parent of the comparison directory (default ``base.output_dir``).
        name: Comparison directory name (default ``compare-<task>-<model>``).
        run: The training function (default :func:`moreft.train.train`); for tests.
        command: The command line to show at the top of ``compare.md``.
        reference: The arm every other is compared with (a spec naming one of them by its adapter
            settings); default ``lora:rank=8`` when it is an arm, else the first.
        log: Called with a line as each run starts and ends (progress); None prints nothing.
        jobs: Runs trained at once, each in a worker process with ``1 / jobs`` of the CPU threads (on a
            CPU, two one-thread runs finish sooner than two two-thread runs one after the other).
        on_run: Called with ``(config, metrics, seconds)`` when a run has trained.

    Returns:
        A :class:`CompareResult`; ``compare.md``, ``compare.png`` and ``compare.json`` are written. A
        run that finished with the same config is reused; one interrupted after a checkpoint resumes.

    Raises:
        ConfigError: No methods, a bad spec or reference, or bad seeds.
    """
    if not methods:
        raise ConfigError("compare needs at least one method spec, e.g. lora:rank=8 more:block_rank=4")
    if isinstance(seeds, int) and not isinstance(seeds, bool) and not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"seeds={seeds} must be a count in [1, {MAX_SEEDS}]")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if (
        not seed_list
        or len(seed_list) > MAX_SEEDS
        or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seed_list)
    ):
        raise ConfigError(
            f"seeds={seeds!r} must be a count in [1, {MAX_SEEDS}] or a list of at most {MAX_SEEDS} "
            f"integers in [0, {MAX_SEED}]"
        )
    specs = [parse_method_spec(m) for m in methods]
    ref = reference_index(specs, reference)
    model_name = Path(base.model).name.removesuffix(".gguf")
    folder = check_folder_name("name", name) if name is not None else f"compare-{base.task}-{model_name}"
    path = Path(output_dir if output_dir is not None else base.output_dir) / folder
    configs = [
        [
            base.replace(
                **arm_changes(spec),
                seed=s,
                run_name=f"{slug(spec)}-seed{s}",
                output_dir=str(path / "runs"),
                resume=False,
                overwrite=True,
            )
            for s in seed_list
        ]
        for spec in specs
    ]
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be an integer >= 1 (runs trained at once)")
    if jobs > 1 and run is not None:
        raise ConfigError(
            "compare trains in worker processes with jobs > 1; a custom run function needs jobs=1"
        )
    found = {(i, j): _finished(c) for i, group in enumerate(configs) for j, c in enumerate(group)}
    pending = [
        (i, j, methods[i], _continued(configs[i][j])) for (i, j), done in found.items() if done is None
    ]
    trained = _train_all(pending, run or train, jobs, log, on_run, len(found))
    rows, metric = [], ""
    for i, (spec_text, spec, group) in enumerate(zip(methods, specs, configs, strict=True)):
        results = [found[(i, j)] or trained[(i, j)] for j in range(len(group))]
        metric = results[0]["metric"]
        values = [r[f"test_{metric}"] for r in results]
        evals = [r.get(f"eval_{metric}", float("nan")) for r in results]
        mean, std = mean_std(values)
        eval_mean, eval_std = mean_std(evals)
        rows.append(
            {
                "label": group[0].method_label() if ":" not in spec_text else spec_text,
                "params": results[0]["trainable_params"],
                "mean": mean,
                "std": std,
                "eval_mean": eval_mean,
                "eval_std": eval_std,
                "values": values,
                "seeds": seed_list,
                "seconds": statistics.fmean(r["train_seconds"] for r in results),
                "peak_rss_mb": max((r["peak_rss_mb"] for r in results if r.get("peak_rss_mb")), default=None),
                "runs": [str(c.run_dir) for c in group],
                "overrides": overrides(spec),
            }
        )
    for i, (row, group) in enumerate(zip(rows, configs, strict=True)):
        row["reference"] = i == ref
        row.update(paired_delta(base, _by_seed(group), _by_seed(configs[ref]), metric))
    write_report(path, rows, metric, base, command)
    return CompareResult(path, rows, metric)


def _by_seed(group: Sequence[TrainConfig]) -> dict[int, str]:
    return {c.seed: str(c.run_dir) for c in group}


def _train_all(
    pending: Sequence[tuple[int, int, str, TrainConfig]],
    run: Callable[[TrainConfig], RunResult],
    jobs: int,
    log: Callable[[str], None] | None,
    on_run: Callable[[TrainConfig, dict[str, Any], float], None] | None,
    total: int,
) -> dict[tuple[int, int], dict[str, Any]]:
    """Train the runs not found finished: one after the other, or ``jobs`` at a time in worker processes."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    done = total - len(pending)

    def finished(
        i: int, j: int, label: str, config: TrainConfig, metrics: dict[str, Any], seconds: float
    ) -> None:
        nonlocal done
        done += 1
        out[(i, j)] = metrics
        if on_run:
            on_run(config, metrics, seconds)
        if log:
            name = metrics["metric"]
            log(
                f"[{done}/{total}] {label} seed {config.seed}: test {name} {metrics[f'test_{name}']:.4f} "
                f"({seconds:.0f} s)"
            )

    if jobs == 1:
        for i, j, label, config in pending:
            if log:
                log(
                    f"[{done + 1}/{total}] {label} seed {config.seed}: "
                    + ("resuming" if config.resume else "training")
                )
            start = time.perf_counter()
            metrics = run(config).metrics
            finished(i, j, label, config, metrics, time.perf_counter() - start)
        return out
    import concurrent.futures
    import multiprocessing

    threads = max(1, torch.get_num_threads() // jobs)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_threads,
        initargs=(threads, os.getpid()),
    ) as pool:
        started = {
            pool.submit(_train_quietly, config): (i, j, label, config) for i, j, label, config in pending
        }
        if log and pending:
            log(f"training {len(pending)} runs, {jobs} at a time ({threads} thread(s) each)")
        for future in concurrent.futures.as_completed(started):
            i, j, label, config = started[future]
            metrics, seconds = future.result()
            finished(i, j, label, config, metrics, seconds)
    return out


def _worker_threads(threads: int, parent: int | None = None) -> None:
    """A worker process of :func:`compare` uses ``threads`` CPU threads, and ends with ``parent``."""
    from moreft.train.orphans import exit_with_parent

    exit_with_parent(parent)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _train_quietly(config: TrainConfig) -> tuple[dict[str, Any], float]:
    """One run in a worker process: its metrics and seconds."""
    start = time.perf_counter()
    return train(config, quiet=True).metrics, time.perf_counter() - start
