"""The Optuna side of ``moreft search``: the study, the objective, pruning reports and worker processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from filelock import FileLock
from transformers import TrainerCallback

from moreft.errors import ConfigError, MoreftError
from moreft.safe_write import atomic_write_text
from moreft.search.settings import (
    CLAIM_FILE,
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    INTERRUPTED,
    RETRY_OF,
    SESSION,
    TRIALS_DIR,
    Candidate,
    Pruner,
    Sampler,
    SearchSettings,
    StudyMismatchError,
)
from moreft.search.space import SearchSpace
from moreft.train.config import TrainConfig


def make_pruner(settings: SearchSettings, base: TrainConfig) -> optuna.pruners.BasePruner:
    """The pruner; rungs count optimizer steps, the first at ``min_steps`` (default ``eval_every``)."""
    first = settings.min_steps or base.eval_every or 1
    if settings.pruner is Pruner.ASHA:
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=settings.reduction_factor
        )
    if settings.pruner is Pruner.HYPERBAND:
        return optuna.pruners.HyperbandPruner(
            min_resource=first,
            max_resource=base.max_steps or "auto",
            reduction_factor=settings.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats: a trial whose process died is failed and retried once."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )


def open_study(
    url: str, name: str, base: TrainConfig, space: SearchSpace, settings: SearchSettings, worker: int
) -> optuna.Study:
    """Create or load the study ``name``; the run settings are stored so a resumed search can check them.

    Raises:
        StudyMismatchError: The stored study was made with a different base config, budget or space.
    """
    from moreft.tasks import get_task

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=make_storage(url),
        study_name=name,
        direction=get_task(base.task, **base.task_options).metric_goal.value,
        pruner=make_pruner(settings, base),
        load_if_exists=True,
    )
    study.sampler = make_sampler(settings, worker, len(study.trials))
    fixed = {"base": _comparable(base), "space": space.to_dict(), "max_params": settings.max_params}
    stored = {k: study.user_attrs.get(k) for k in fixed}
    if stored["base"] is None and not study.trials:
        for key, value in fixed.items():
            study.set_user_attr(key, value)
        return study
    space_diffs = _space_diffs(stored["space"], space)
    what = [k for k in ("base", "max_params") if stored[k] != fixed[k]] + (["space"] if space_diffs else [])
    if what:
        old = stored["base"] or {}
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fixed["base"].items() if old.get(k) != v]
        if "max_params" in what:
            diffs.append(f"max_params: {stored['max_params']!r} -> {settings.max_params!r}")
        diffs += space_diffs
        raise StudyMismatchError(
            f"study {name!r} in {url} was made with a different {' and '.join(what)} ({', '.join(diffs)}); "
            "resume it with the same settings, or pass another --name / --storage"
        )
    return study


def make_sampler(settings: SearchSettings, worker: int, existing: int) -> optuna.samplers.BaseSampler:
    """The sampler of one worker: seeded by the search's seed, the worker, and the trials the study
    already holds, so a resumed search draws new values rather than its first session's again (a
    retried trial keeps its own), while an uninterrupted search is reproducible from its seed."""
    seed = settings.seed + worker + 1009 * existing
    if settings.sampler is Sampler.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, settings.trials // 3))


def _space_diffs(stored: Any, space: SearchSpace) -> list[str]:
    """How the stored space samples differently from ``space`` (empty: the same draws), by
    architecture and lr interval, so that editing the range of an arm a study does not search
    leaves the study resumable."""
    try:
        old = SearchSpace.from_dict(stored).sampled()
    except (ConfigError, TypeError):
        return ["the search space"]
    new = space.sampled()
    if old == new:
        return []
    diffs = [
        f"{key}: lr {_interval(old['architectures'][key][1])} -> {_interval(new['architectures'][key][1])}"
        for key in old["architectures"].keys() & new["architectures"].keys()
        if old["architectures"][key][1] != new["architectures"][key][1]
    ]
    for label, keys in (
        ("architectures added", new["architectures"].keys() - old["architectures"].keys()),
        ("architectures dropped", old["architectures"].keys() - new["architectures"].keys()),
    ):
        if keys:
            diffs.append(f"{label}: {', '.join(sorted(keys))}")
    if old["batch_size"] != new["batch_size"]:
        diffs.append(f"batch_size: {list(old['batch_size'])} -> {list(new['batch_size'])}")
    return diffs or ["the search space"]


def _interval(lr: Any) -> str:
    return f"[{lr.low:.2g}, {lr.high:.2g}]" + ("" if lr.log else " linear")


def _comparable(base: TrainConfig) -> dict[str, Any]:
    """The base config fields that change what a trial learns (not where it is written or shown)."""
    skip = {
        "output_dir",
        "run_name",
        "resume",
        "overwrite",
        "progress",
        "keep_checkpoints",
        "save_every",
        "log_every",
        "eval_batch_size",
    }
    return {k: v for k, v in base.to_dict().items() if k not in skip}


def requeue_interrupted(study: optuna.Study) -> int:
    """Enqueue again each trial stopped by Ctrl-C (not yet retried); returns how many."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    todo = [
        t
        for t in trials
        if t.state is optuna.trial.TrialState.FAIL
        and t.user_attrs.get(INTERRUPTED)
        and t.number not in retried
    ]
    for t in todo:
        study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number})
    return len(todo)


def started(study: optuna.Study, session: str) -> int:
    """Finished trials and those running in ``session``: a worker starts another only below the budget,
    so ``jobs`` workers do not overshoot it (a trial left running by a killed search is not counted)."""
    trials = study.get_trials(
        deepcopy=False,
        states=(
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.RUNNING,
        ),
    )
    return sum(
        t.state is not optuna.trial.TrialState.RUNNING or t.user_attrs.get(SESSION) == session for t in trials
    )


def counted(study: optuna.Study) -> int:
    """Finished trials (complete or pruned)."""
    return len(
        study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        )
    )


class ReportToOptuna(TrainerCallback):
    """Reports ``eval_<metric>`` to the trial at each evaluation and stops the run when it is pruned."""

    def __init__(self, trial: optuna.Trial, key: str) -> None:
        self.trial, self.key, self.last_step = trial, key, -1

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        """Raises ``optuna.TrialPruned`` (which ends the run) when the pruner says so."""
        value = (metrics or {}).get(self.key)
        if value is None or state.global_step == self.last_step or not math.isfinite(value):
            return
        self.last_step = state.global_step
        self.trial.report(value, state.global_step)
        self.trial.set_user_attr("last_step", state.global_step)
        if state.global_step < state.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step}: {self.key}={value:.4f}")


class Objective:
    """Samples an architecture (in the budget), lr and batch size; trains; returns the validation metric."""

    def __init__(
        self, base: TrainConfig, space: SearchSpace, allowed: dict[str, Candidate], path: Path
    ) -> None:
        from moreft.tasks import get_task

        self.base, self.space, self.allowed, self.path = base, space, allowed, path
        self.metric = get_task(base.task, **base.task_options).metric_name

    def __call__(self, trial: optuna.Trial) -> float:
        from moreft.train.loop import train

        key, lr, batch_size = self.space.suggest(trial, list(self.allowed))
        candidate = self.allowed[key]
        config = self.base.replace(
            **candidate.changes,
            lr=lr,
            batch_size=batch_size,
            run_name=f"trial-{trial.number:04d}",
            output_dir=str(self.path / TRIALS_DIR),
            resume=False,
            overwrite=True,
            progress=False,
        )
        trial.set_user_attr("params", candidate.params)
        trial.set_user_attr("config", config.to_dict())
        start = time.perf_counter()
        try:
            metrics = train(
                config, callbacks=[ReportToOptuna(trial, f"eval_{self.metric}")], quiet=True
            ).metrics
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        trial.set_user_attr("test", metrics.get(f"test_{self.metric}"))
        return float(metrics[f"eval_{self.metric}"])


def _printer(metric: str) -> Any:
    def show(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        attrs, params = trial.user_attrs, trial.params
        head = (
            f"trial {trial.number}: {params.get('architecture')} lr={params.get('lr', float('nan')):.2e} "
            f"batch={params.get('batch_size')} params={attrs.get('params') or 0:,}"
        )
        if trial.state is optuna.trial.TrialState.COMPLETE:
            print(f"{head} -> eval_{metric}={trial.value:.4f} ({attrs.get('seconds', 0):.0f} s)", flush=True)
        elif trial.state is optuna.trial.TrialState.PRUNED:
            last = trial.intermediate_values.get(attrs.get("last_step", -1), float("nan"))
            print(f"{head} -> pruned at step {attrs.get('last_step')} (eval_{metric}={last:.4f})", flush=True)
        else:
            print(f"{head} -> {trial.state.name.lower()}", flush=True)

    return show


def work(
    url: str,
    name: str,
    base: dict[str, Any],
    space: dict[str, Any],
    settings: dict[str, Any],
    path: str,
    quiet: bool,
    allowed: dict[str, Any],
    worker: int = 0,
    session: str = "",
) -> None:
    """One search worker: draw and run trials until the study has ``settings.trials`` counted trials.

    A worker starts a trial only while finished plus running trials (of ``session``: this search's
    workers) are fewer, checked and claimed under a file lock, so ``jobs`` workers never overshoot
    the budget; it makes at most as many attempts as trials were missing (failing trials end it).

    Plain (JSON) arguments, so that a worker process can be started with them; ``allowed`` maps
    each architecture key to be tried to ``{"changes": ..., "params": ...}`` (see :class:`Candidate`).
    """
    base, space, settings = (
        TrainConfig.from_dict(base),
        SearchSpace.from_dict(space),
        SearchSettings.from_dict(settings),
    )
    study = open_study(url, name, base, space, settings, worker)
    tried = {key: Candidate(key, c["changes"], c["params"], None) for key, c in allowed.items()}
    objective = Objective(base, space, tried, Path(path))
    claim = FileLock(str(Path(path) / CLAIM_FILE))

    def claimed(trial: optuna.Trial) -> float:
        try:
            trial.set_user_attr(SESSION, session)  # now counted by started(): the claim is made
        finally:
            claim.release()
        return objective(trial)

    callbacks = [] if quiet else [_printer(objective.metric)]
    start = time.monotonic()
    for _ in range(max(0, settings.trials - counted(study))):
        left = None if settings.timeout is None else settings.timeout - (time.monotonic() - start)
        with claim:  # released by claimed() once the trial is marked, or here if none was run
            if started(study, session) >= settings.trials or (left is not None and left <= 0):
                return
            study.optimize(
                claimed,
                n_trials=1,
                timeout=left,
                callbacks=callbacks,
                catch=(MoreftError, ValueError, RuntimeError),
            )


def run_workers(job: dict[str, Any], jobs: int, file: Path) -> None:
    """Run ``jobs`` worker processes (``python -m moreft.search.study FILE I``) on one study and wait.

    The CPU threads are split between them. A worker that fails leaves its trial to the others.

    Raises:
        SearchError: Every worker failed (the first one's exit status is given).
    """
    atomic_write_text(file, json.dumps(job))
    threads = max(1, torch.get_num_threads() // jobs)
    env = {
        **os.environ,
        "MOREFT_PARENT_PID": str(os.getpid()),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    procs = [
        subprocess.Popen([sys.executable, "-m", "moreft.search.study", str(file), str(i)], env=env)
        for i in range(jobs)
    ]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    if all(codes):
        raise SearchError(
            f"all {jobs} search workers failed (exit status {codes[0]}); run with --jobs 1 to see why"
        )


class SearchError(MoreftError, RuntimeError):
    """The search could not run its trials."""


if __name__ == "__main__":  # a worker of run_workers
    from moreft.train.orphans import exit_with_parent

    _parent = os.environ.get("MOREFT_PARENT_PID")
    exit_with_parent(int(_parent) if _parent else None)  # a killed search leaves no worker training on
    _job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work(**_job, worker=int(sys.argv[2]))
