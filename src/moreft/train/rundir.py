"""The run directory ``runs/<name>/`` and loading what a finished run saved.

==================  ===========================================================================
``config.yaml``     the resolved :class:`TrainConfig`
``split.json``      source ids of the train / validation / test examples
``metrics.jsonl``   one JSON object per log: ``step``, ``loss``, ``lr``; ``eval_<metric>`` ...
``metrics.json``    final numbers: ``trainable_params``, ``eval_<m>``, ``test_<m>``, ``train_seconds``,
                    ``peak_rss_mb``, ...
``adapter/``        the trained adapter (:func:`moreft.save_adapter` format; with the head)
``loss.png``        training loss and eval metric curves
``checkpoints/``    ``checkpoint-<step>/`` for ``--resume`` (adapter + optimizer state)
``.moreft.lock``    held (``flock``) by the process writing the run; removed when it ends
==================  ===========================================================================

``merged_base.safetensors`` (``merge_every`` runs) and ``delta_<layer>.png`` (``moreft inspect``)
may sit beside them. These names, temp siblings of them that an atomic write left
(``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``), a moreft adapter in ``adapter/`` and
``checkpoint-<step>`` folders in ``checkpoints/`` are what moreft owns in a run folder;
``--overwrite`` deletes only those, and refuses a folder holding anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import moreft
from moreft.errors import ConfigError, OutputError
from moreft.files import foreign_entries
from moreft.lock import LOCK_NAME
from moreft.tasks import Splits, Task, TaskKind, get_task
from moreft.train.config import TrainConfig


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def split(self) -> Path:
        return self.path / "split.json"

    @property
    def metrics_log(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        """The checkpoint with the highest step that holds a complete trainer state, or None."""
        return newest_complete_checkpoint(self.checkpoints)


_CHECKPOINT = re.compile(r"(?:tmp-)?checkpoint-\d+")


def foreign_run_entries(path: Path) -> list[str]:
    """Entries of run folder ``path`` that moreft did not write there (see the module docstring)."""
    from moreft.state import ADAPTER_KIND
    from moreft.train.reinit import MERGED_BASE_FILE

    files = ("config.yaml", "split.json", "metrics.jsonl", "metrics.json", "loss.png", MERGED_BASE_FILE,
             LOCK_NAME)
    names = "|".join(map(re.escape, (*files, "adapter")))
    temp = re.compile(rf"\.(?:{names})\.(?:tmp-\d+-[a-z0-9_]{{8}}|old-\d+)")
    out = []
    for name in sorted(os.listdir(path)):
        entry = path / name
        if entry.is_symlink():
            out.append(name)
        elif name in files or re.fullmatch(r"delta_.+\.png", name):
            out += [] if entry.is_file() else [name]
        elif temp.fullmatch(name):
            continue
        elif name == "adapter" and entry.is_dir():
            out += [f"adapter/{n}" for n in foreign_entries(entry, ADAPTER_KIND)]
        elif name == "checkpoints" and entry.is_dir():
            out += [f"checkpoints/{c.name}" for c in sorted(entry.iterdir())
                    if c.is_symlink() or not c.is_dir() or not _CHECKPOINT.fullmatch(c.name)]
        else:
            out.append(name)
    return out


def check_run_owned(path: Path) -> None:
    """Refuse to start over in ``path`` when it holds anything moreft did not write there.

    Raises:
        OutputError: names the foreign entries; nothing is deleted.
    """
    foreign = foreign_run_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"--overwrite would delete run directory {str(path)!r}, but it holds files moreft "
                          f"did not write there ({shown}); moreft deletes only its own run files. Move them "
                          "away or choose another --run-name")


def clear_run(path: Path) -> None:
    """Delete what an earlier run wrote in ``path`` (never the lock file, which this process holds).

    Raises:
        OutputError: ``path`` holds anything else (see :func:`check_run_owned`); nothing is deleted then.
    """
    check_run_owned(path)
    for entry in sorted(path.iterdir()):
        if entry.name == LOCK_NAME:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def newest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The ``checkpoint-<step>`` under ``checkpoints`` with the highest step that is complete, or None."""
    done = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and checkpoint_complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def checkpoint_complete(path: Path) -> bool:
    """True when a Trainer checkpoint was written to the end, so a run killed mid-save resumes from the one before.

    The Trainer writes the adapter, optimizer, scheduler and RNG state, then ``trainer_state.json``
    last; that file parsing as JSON (a torn write does not) means the rest is complete.
    """
    needed = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
    if not all((path / name).is_file() for name in needed):
        return False
    try:
        return isinstance(json.loads((path / "trainer_state.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun / accelerate launch."""
    return int(os.environ.get("RANK", "0")) == 0


def precision_dtype(precision: str) -> torch.dtype:
    """``torch.float32`` for ``fp32``, ``torch.bfloat16`` for ``bf16``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run directory.

    Raises:
        ConfigError: ``run_dir`` has no ``config.yaml`` or it is not a valid run config.
    """
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise ConfigError(f"{str(run.path)!r} is not a moreft run directory: it has no config.yaml "
                          "(run `moreft train` first, or point at runs/<name>)")
    try:
        data = yaml.safe_load(run.config.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(run.config)!r} is not valid YAML: {exc}") from None
    return TrainConfig.from_dict(data)


def model_defaults(model_name: str, model: torch.nn.Module, kind: TaskKind) -> tuple[Any, tuple[str, ...]]:
    """``(default target_modules, head modules to train in full)`` for a loaded model.

    Named models take both from :data:`moreft.models.MODELS`; for a local directory the targets
    default to moreft's per-family defaults (None) and the head is every top-level child with
    parameters other than the backbone (``classifier`` for BERT/RoBERTa, ``score`` for Llama).
    """
    from moreft.models import MODELS

    if kind is not TaskKind.CLASSIFICATION:
        heads: tuple[str, ...] = ()
    elif model_name in MODELS:
        heads = (MODELS[model_name].head_module,)
    else:
        prefix = getattr(model, "base_model_prefix", None)
        heads = tuple(n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters()))
    targets = MODELS[model_name].target_modules if model_name in MODELS else None
    return targets, heads


def load_base(config: TrainConfig, task: Task) -> tuple[torch.nn.Module, Any]:
    """Load the run's base model and tokenizer (no adapter), offline."""
    from moreft.models import load_model

    return load_model(config.model, task.kind, num_labels=task.num_labels,
                      dtype=precision_dtype(config.precision))


def load_splits(run_dir: str | os.PathLike, config: TrainConfig, task: Task) -> Splits:
    """Re-create the run's split and check it against ``split.json``.

    Raises:
        ConfigError: The data gives a different split than the one saved (the data changed).
    """
    splits = task.load(config.seed, config.max_examples)
    run = RunDir(Path(run_dir))
    if run.split.is_file():
        saved = json.loads(run.split.read_text())
        if saved.get("ids", saved) != splits.split_ids:
            raise ConfigError(f"the {config.task!r} data now splits differently from {str(run.split)!r}; "
                              "the data package changed since the run was trained")
    return splits


def load_trained(run_dir: str | os.PathLike) -> tuple[TrainConfig, Task, torch.nn.Module, Any]:
    """``(config, task, model with the trained adapter, tokenizer)`` for a finished run.

    Raises:
        ConfigError: Not a run directory, or an invalid saved config.
        moreft.AdapterFileError: The run has no ``adapter/`` (it did not finish) or it does not fit.
    """
    config = read_run_config(run_dir)
    run = RunDir(Path(run_dir))
    if not run.adapter.is_dir():
        last = run.last_checkpoint()
        hint = f"; resume it with `moreft train --config {run.config} --resume`" if last else ""
        raise moreft.AdapterFileError(f"{str(run.path)!r} has no adapter/: the run did not finish{hint}")
    task = get_task(config.task, **config.task_options)
    model, tokenizer = load_base(config, task)
    from moreft.train.reinit import MERGED_BASE_FILE, apply_merged_base

    if (run.path / MERGED_BASE_FILE).is_file():  # a merge_every run: earlier cycles live in the base weights
        apply_merged_base(model, run.path / MERGED_BASE_FILE)
    moreft.load_adapter(model, run.adapter, check_base=False)
    model.eval()
    return config, task, model, tokenizer
