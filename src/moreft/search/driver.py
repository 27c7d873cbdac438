"""``moreft search``: adapter architecture + hyperparameter search on Optuna, with ASHA pruning.

    from moreft.search import SearchSettings, SearchSpace, run_search
    from moreft.train import resolve_config
    base = resolve_config("recipes/demo.yaml", {"max_steps": 60, "eval_every": 15})
    space = SearchSpace(methods=("more", "lora"), lr=(3e-4, 3e-3))
    result = run_search(base, space, SearchSettings(trials=8, max_params=100_000))
    print(result.best_config.method_label(), result.path / "search.md")

Each trial is an ordinary run (``<dir>/trials/trial-NNNN/``) of ``base`` with the sampled method,
architecture, target modules, lr and batch size; it reports the validation metric at every
``eval_every`` steps and Optuna's successive-halving (ASHA, as the MoRe authors ran with Ray Tune)
or Hyperband pruner stops the bad ones early. Configurations above ``max_params`` trainable
adapter parameters are rejected before training: they are counted by injecting the adapter into
the model built on the ``meta`` device (no weights, no training). The study lives in a SQLite file
in the search directory unless another Optuna storage URL is given, so an interrupted search
resumes where it stopped, and several processes or machines can share one study. The test split
is never used to choose: it is only reported.
"""

from __future__ import annotations

import copy
import functools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import moreft
from moreft.errors import ConfigError, MoreftError
from moreft.search.settings import STUDY_FILE, WORKERS_FILE, Candidate, Pruner, SearchSettings
from moreft.search.space import SQUARE, SearchSpace
from moreft.train.choices import RunMethod
from moreft.train.config import TrainConfig
from moreft.train.value_checks import check_folder_name


# -- counting parameters without training -------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _skeleton(model: str, kind: str, num_labels: int | None) -> torch.nn.Module:
    """The model's architecture on the ``meta`` device (shapes only, no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from moreft.models import model_dir

    path = model_dir(model)
    extra = {"num_labels": num_labels} if kind == "classification" else {}
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True, **extra)
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(hf_config)


def _meta_model(config: TrainConfig) -> tuple[torch.nn.Module, Any, tuple[str, ...]]:
    """A fresh meta-device copy of the run's model, its default targets and head modules."""
    from moreft.tasks import get_task
    from moreft.train.rundir import model_defaults

    task = get_task(config.task, **config.task_options)
    model = copy.deepcopy(_skeleton(config.model, task.kind.value, task.num_labels))
    targets, heads = model_defaults(config.model, model, task.kind)
    return model, targets, heads


def count_adapter_params(config: TrainConfig) -> int:
    """Trainable adapter parameters of ``config`` (heads excluded, as the papers count), without training;
    a peft arm (method peft) is counted the same way (:func:`moreft.train.peft_arm.count_parameters`), and
    full fine-tuning counts every parameter of the model, as its run reports (``trainable_params``).

    Raises:
        ConfigError / TargetError: The configuration does not fit the model (e.g. ``nblocks > in``).
    """
    model, targets, heads = _meta_model(config)
    if config.full:
        return sum(p.numel() for p in model.parameters())
    if config.method == RunMethod.PEFT:  # peft's own classes build on the meta device too
        from moreft.tasks import TaskKind, get_task
        from moreft.train import peft_arm

        kind = get_task(config.task, **config.task_options).kind
        model, _ = peft_arm.attach(
            model,
            str(config.peft_type),
            config.peft_options,
            config.target_modules or targets,
            heads,
            kind is TaskKind.CLASSIFICATION,
        )
        return peft_arm.count_parameters(model).adapter
    moreft.inject(model, config.adapter_config(targets, heads))
    return moreft.count_parameters(model).adapter


def square_block_rank(config: TrainConfig, nblocks: int, target_modules: Any) -> int:
    """The ``block_rank`` that makes MoRe's blocks square on every targeted layer: the smallest block size.

    Raises:
        ConfigError: ``nblocks`` exceeds a targeted layer's width.
    """
    from moreft.inject import resolve_targets
    from moreft.layers import linear_shape
    from moreft.ops.monarch import block_sizes

    model, targets, heads = _meta_model(config)
    adapter = config.replace(target_modules=target_modules) if target_modules is not None else config
    names = resolve_targets(model, adapter.adapter_config(targets, heads))
    shapes = [linear_shape(model.get_submodule(n)) for n in names]  # (out, in)
    if any(nblocks > min(s) for s in shapes):
        raise ConfigError(
            f"square MoRe blocks: nblocks={nblocks} exceeds the width of a targeted layer "
            f"(smallest is {min(min(s) for s in shapes)})"
        )
    return min(min(block_sizes(i, o, nblocks)) for o, i in shapes)  # (in_block, out_block) per layer


def candidates(base: TrainConfig, space: SearchSpace, max_params: int | None) -> list[Candidate]:
    """Count the parameters of every architecture of ``space`` on ``base``'s model (meta device).

    Raises:
        ConfigError: No architecture is valid and within ``max_params``.
    """
    out = []
    for key, changes in space.architectures().items():
        changes = dict(changes)
        try:
            if changes.get("block_rank") == SQUARE:
                changes["block_rank"] = square_block_rank(
                    base, changes["nblocks"], changes.get("target_modules")
                )
            params = count_adapter_params(base.replace(**changes))
        except MoreftError as exc:
            out.append(Candidate(key, changes, None, f"invalid: {exc}"))
            continue
        over = max_params is not None and params > max_params
        out.append(
            Candidate(
                key, changes, params, f"{params:,} params > max_params {max_params:,}" if over else None
            )
        )
    if not any(c.excluded is None for c in out):
        smallest = min((c.params for c in out if c.params is not None), default=None)
        raise ConfigError(
            f"no architecture of the space fits: max_params={max_params} but the smallest valid one has "
            f"{smallest} adapter params"
            if smallest
            else f"no architecture of the space fits the model: {out[0].excluded if out else 'empty space'}"
        )
    return out


# -- the search -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchResult:
    """What :func:`run_search` produced.

    Attributes:
        path: The search directory (``search.md``, ``.png``, ``.json``, ``best.yaml``, ``trials/``).
        study: The Optuna study.
        best_config: The best trial's run config (None if no trial completed).
        rows: One summary dict per trial (see :func:`moreft.search.report.trial_rows`).
        candidates: Every architecture with its parameter count, and why it was excluded if it was.
    """

    path: Path
    study: Any
    best_config: TrainConfig | None
    rows: list[dict[str, Any]]
    candidates: list[Candidate]


def search_dir(base: TrainConfig, settings: SearchSettings) -> Path:
    """``<base.output_dir>/<settings.name or search-<task>-<model>>``."""
    if settings.name is not None:
        return Path(base.output_dir) / check_folder_name("name", settings.name)
    return Path(base.output_dir) / f"search-{base.task}-{Path(base.model).name.removesuffix('.gguf')}"


def check_base(base: TrainConfig, settings: SearchSettings) -> None:
    """Refuse a base config the search cannot work with.

    Raises:
        ConfigError: Pruning without ``eval_every`` (no intermediate scores to compare).
    """
    if settings.pruner is not Pruner.NONE and not base.eval_every:
        raise ConfigError(
            f"pruner {settings.pruner.value!r} needs intermediate scores: set eval_every (e.g. "
            "max_steps // 4), or use --pruner none"
        )


def run_search(
    base: TrainConfig,
    space: SearchSpace | None = None,
    settings: SearchSettings | None = None,
    command: str | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Run (or resume) a search and write its report.

    Args:
        base: Shared run settings (task, model, steps, eval_every, ...); each trial changes the
            sampled fields only.
        space: What to sample (default :class:`SearchSpace`).
        settings: How to search (default :class:`SearchSettings`).
        command: The command line, quoted in ``search.md``.
        quiet: Print nothing.

    Returns:
        A :class:`SearchResult`.

    Raises:
        ConfigError: Invalid settings or base config.
    """
    from moreft.search import study as search_run
    from moreft.search.report import write_report

    space = space or SearchSpace()
    settings = settings or SearchSettings()
    check_base(base, settings)
    path = search_dir(base, settings)
    path.mkdir(parents=True, exist_ok=True)
    storage_url = settings.storage or f"sqlite:///{(path / STUDY_FILE).resolve()}"
    found = candidates(base, space, settings.max_params)
    study = search_run.open_study(storage_url, path.name, base, space, settings, worker=0)
    search_run.requeue_interrupted(study)
    start = time.perf_counter()
    job = {
        "url": storage_url,
        "name": path.name,
        "base": base.to_dict(),
        "space": space.to_dict(),
        "settings": settings.to_dict(),
        "path": str(path),
        "quiet": quiet,
        "allowed": {c.key: {"changes": c.changes, "params": c.params} for c in found if c.excluded is None},
        "session": uuid.uuid4().hex,
    }
    if settings.jobs == 1:
        search_run.work(**job)
    else:
        search_run.run_workers(job, settings.jobs, path / WORKERS_FILE)
    rows, best = write_report(
        path, study, base, space, settings, found, command=command, wall_seconds=time.perf_counter() - start
    )
    if not quiet:
        print(
            f"wrote {path / 'search.md'} and {path / 'search.png'}"
            + (f"; best config: {path / 'best.yaml'}" if best else "; no trial completed"),
            flush=True,
        )
    return SearchResult(path, study, best, rows, found)
