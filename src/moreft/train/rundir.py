"""The run directory ``runs/<name>/`` and loading what a finished run saved.

==================  ===========================================================================
``config.yaml``     the resolved :class:`TrainConfig`
``split.json``      source ids of the train / validation / test examples
``metrics.jsonl``   one JSON object per log: ``step``, ``loss``, ``lr``; ``eval_<metric>`` ...
``metrics.json``    final numbers: ``trainable_params``, ``eval_<m>``, ``test_<m>``, ``train_seconds``,
                    ``peak_rss_mb``, ...
``test_predictions.jsonl``  the prediction for each test example (:mod:`moreft.train.predictions`)
``adapter/``        the trained adapter (:func:`moreft.save_adapter` format; with the head), or for a
                    peft arm (method peft) peft's ``save_pretrained`` output; a full fine-tuning run
                    (``method: full``) has ``model.safetensors`` instead: every weight
``loss.png``        training loss and eval metric curves
``checkpoints/``    ``checkpoint-<step>/`` for ``--resume`` (adapter or weights + optimizer state)
``tensorboard/``    TensorBoard event files, with ``trainer_args: {report_to: tensorboard}``
``.moreft.lock``    held (``flock``) by the process writing the run; removed when it ends
==================  ===========================================================================

``merged_base.safetensors`` (``merge_every`` runs), ``delta_<layer>.png`` and ``weights.png``
(``moreft inspect``) may sit beside them. These names, temp siblings of them that an atomic write left
(``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``), a moreft adapter in ``adapter/`` and
``checkpoint-<step>`` folders in ``checkpoints/`` are what moreft owns in a run folder;
``--overwrite`` deletes only those, and refuses a folder holding anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import moreft
from moreft.errors import ConfigError, OutputError
from moreft.lock import LOCK_NAME
from moreft.safe_write import foreign_entries
from moreft.tasks import Splits, Task, TaskKind, get_task
from moreft.train.bounded import load_yaml, read_json_file, read_text_file
from moreft.train.checkpoints import checkpoint_complete, step_of
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
    def test_predictions(self) -> Path:
        return self.path / "test_predictions.jsonl"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model_weights(self) -> Path:
        """A full fine-tuning run's trained weights (:mod:`moreft.train.weights`)."""
        from moreft.train.weights import FULL_WEIGHTS_FILE

        return self.path / FULL_WEIGHTS_FILE

    def finished(self) -> bool:
        """True when the run saved what it trained: an adapter, or full fine-tuning's weights."""
        return self.adapter.is_dir() or self.model_weights.is_file()

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def last_checkpoint(self) -> Path | None:
        """The checkpoint with the highest step that holds a complete trainer state, or None."""
        return newest_complete_checkpoint(self.checkpoints)


_CHECKPOINT = re.compile(r"(?:tmp-)?checkpoint-\d+")


def foreign_run_entries(path: Path) -> list[str]:
    """Entries of run folder ``path`` that moreft did not write there (see the module docstring)."""
    from moreft.adapter_files import ADAPTER_KIND
    from moreft.train.peft_arm import PEFT_ADAPTER_KIND, is_peft_adapter
    from moreft.train.reinit import MERGED_BASE_FILE
    from moreft.train.weights import FULL_WEIGHTS_FILE

    files = (
        "config.yaml",
        "split.json",
        "metrics.jsonl",
        "metrics.json",
        "loss.png",
        MERGED_BASE_FILE,
        LOCK_NAME,
        "weights.png",
        "test_predictions.jsonl",
        FULL_WEIGHTS_FILE,
    )
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
            kind = PEFT_ADAPTER_KIND if is_peft_adapter(entry) else ADAPTER_KIND
            out += [f"adapter/{n}" for n in foreign_entries(entry, kind)]
        elif name == "tensorboard" and entry.is_dir():
            continue  # the run's TensorBoard logs (report_to: tensorboard)
        elif name == "checkpoints" and entry.is_dir():
            out += [
                f"checkpoints/{c.name}"
                for c in sorted(entry.iterdir())
                if c.is_symlink() or not c.is_dir() or not _CHECKPOINT.fullmatch(c.name)
            ]
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
        raise OutputError(
            f"--overwrite would delete run directory {str(path)!r}, but it holds files moreft "
            f"did not write there ({shown}); moreft deletes only its own run files. Move them "
            "away or choose another --run-name"
        )


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
    done = [p for p in checkpoints.glob("checkpoint-*") if step_of(p) is not None and checkpoint_complete(p)]
    return max(done, key=lambda p: step_of(p) or 0, default=None)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun / accelerate launch."""
    return int(os.environ.get("RANK", "0")) == 0


def precision_dtype(precision: str) -> torch.dtype:
    """``torch.float32`` for ``fp32``, ``torch.bfloat16`` for ``bf16``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run directory.

    Raises:
        ConfigError: ``run_dir`` has no ``config.yaml``, or it is too large, not UTF-8, not YAML or
            not a valid run config.
    """
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise ConfigError(
            f"{str(run.path)!r} is not a moreft run directory: it has no config.yaml "
            "(run `moreft train` first, or point at runs/<name>)"
        )
    data = load_yaml(read_text_file(run.config, "run config"), f"run config {str(run.config)!r}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"run config {str(run.config)!r} must be a mapping of field: value, got {type(data).__name__}"
        )
    return TrainConfig.from_dict(data)


def model_defaults(model_name: str, model: torch.nn.Module, kind: TaskKind) -> tuple[Any, tuple[str, ...]]:
    """``(default target_modules, head modules to train in full)`` for a loaded model.

    Both come from :mod:`moreft.models`: a packaged model's targets are its family's
    (:attr:`moreft.models.ModelSpec.target_modules`); a local directory's are None (moreft's
    per-family defaults, :data:`moreft.targets.DEFAULT_TARGETS`). The heads are the modules
    :func:`moreft.models.head_modules` says loading created new.
    """
    from moreft.models import MODELS, head_modules

    targets = MODELS[model_name].target_modules if model_name in MODELS else None
    return targets, head_modules(model_name, model, kind)


def load_base(config: TrainConfig, task: Task) -> tuple[torch.nn.Module, Any]:
    """Load the run's base model and tokenizer (no adapter), offline."""
    from moreft.models import load_model

    return load_model(
        config.model,
        task.kind,
        num_labels=task.num_labels,
        dtype=precision_dtype(config.precision),
        seed=config.seed,
    )


def position_limit(model: torch.nn.Module) -> int | None:
    """How many token positions ``model`` can embed: the rows of its absolute position table (less
    RoBERTa's padding offset); None for rotary or relative positions, which index no table (a longer
    sequence runs, beyond the length the model was trained at)."""
    for name, module in model.named_modules():
        if name.endswith(("position_embeddings", "wpe")) and isinstance(module, torch.nn.Embedding):
            pad = module.padding_idx
            return module.num_embeddings - (pad + 1 if pad is not None else 0)
    return None


def check_max_length(config: TrainConfig, model: torch.nn.Module, kind: TaskKind) -> None:
    """Refuse a ``max_length`` (plus ``max_new_tokens`` when generating) beyond the model's positions.

    Raises:
        ConfigError: The run would index past the position table mid-training or mid-evaluation.
    """
    limit = position_limit(model)
    if limit is None and kind is TaskKind.LANGUAGE_MODELING:  # RoPE: the positions it is configured for
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    need = config.max_length + (config.max_new_tokens if kind is TaskKind.GENERATION else 0)
    if limit is not None and need > limit:
        what = (
            f"max_length={config.max_length} + max_new_tokens={config.max_new_tokens}"
            if kind is TaskKind.GENERATION
            else f"max_length={config.max_length}"
        )
        raise ConfigError(
            f"{what} is more than model {config.model!r} takes ({limit} positions); lower "
            f"--max-length{' / --max-new-tokens' if kind is TaskKind.GENERATION else ''} to fit"
        )


def data_digest(splits: Splits) -> str:
    """SHA-256 of every example of every split, in order: it changes when the data does, even at equal ids."""
    digest = hashlib.sha256()
    for name in ("train", "validation", "test"):
        for example in getattr(splits, name):
            fields = getattr(example, "__dict__", None) or dataclasses.asdict(example)
            row = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
            digest.update(f"{name}\t{row}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def split_record(config: TrainConfig, splits: Splits) -> dict[str, Any]:
    """What ``split.json`` holds: task, seed, sizes, source ids per split and :func:`data_digest`."""
    return {
        "task": config.task,
        "seed": config.seed,
        "sizes": splits.sizes,
        "ids": splits.split_ids,
        "data_sha256": data_digest(splits),
    }


def check_split(run_dir: str | os.PathLike, config: TrainConfig, splits: Splits) -> bool:
    """Check ``splits`` against the run's saved ``split.json``; False when the run has none yet.

    Raises:
        ConfigError: ``split.json`` is unreadable, or the data now gives other ids or other examples.
    """
    run = RunDir(Path(run_dir))
    if not run.split.is_file():
        return False
    saved = read_json_file(run.split, "split file")
    ids = saved.get("ids") if isinstance(saved, dict) else None
    if not isinstance(ids, dict):
        raise ConfigError(f"{str(run.split)!r} is not a moreft split file (a JSON object with 'ids')")
    digest = saved.get("data_sha256")
    if ids != splits.split_ids or (digest is not None and digest != data_digest(splits)):
        what = "splits differently" if ids != splits.split_ids else "holds other examples"
        raise ConfigError(
            f"the {config.task!r} data now {what} than when {str(run.split)!r} was saved (the data file "
            "or package changed); restore that data, or start a new run (--overwrite / another "
            "--run-name)"
        )
    return True


def load_splits(run_dir: str | os.PathLike, config: TrainConfig, task: Task) -> Splits:
    """Re-create the run's split and check it against ``split.json``.

    Raises:
        ConfigError: The data gives a different split than the one saved (the data changed).
    """
    splits = task.load(config.seed, config.max_examples, config.eval_fraction)
    check_split(run_dir, config, splits)
    return splits


def load_trained(
    run_dir: str | os.PathLike, moreft_only: str | None = None
) -> tuple[TrainConfig, Task, torch.nn.Module, Any]:
    """``(config, task, model with the trained adapter, tokenizer)`` for a finished run (for ``method:
    full``, the model with its trained weights and no adapter).

    A peft arm (method peft) comes back as peft's ``PeftModel`` (``PeftModel.from_pretrained``).

    Args:
        run_dir: The run directory.
        moreft_only: A command that works on moreft's own adapters only (e.g. ``"moreft merge"``):
            a peft arm is then refused before anything is loaded.

    Raises:
        ConfigError: Not a run directory, an invalid saved config, a peft arm with ``moreft_only``, or
            a from-scratch base that this installation no longer draws the same
            (:func:`moreft.train.weights.check_init_digest`).
        moreft.AdapterFileError: The run has no ``adapter/`` (``model.safetensors``): it did not
            finish; or what it saved does not fit.
    """
    from moreft.train.weights import check_init_digest, load_full_weights

    config = read_run_config(run_dir)
    if moreft_only and config.method == "peft":
        raise ConfigError(
            f"{moreft_only} works on moreft's own adapters; {str(run_dir)!r} trained peft's "
            f"{config.method_label()}. Load it with peft instead: PeftModel.from_pretrained(base, "
            f"'{Path(run_dir) / 'adapter'}') (then merge_and_unload() to merge); `moreft eval` works"
        )
    run = RunDir(Path(run_dir))
    saved = run.model_weights if config.full else run.adapter
    if not (saved.is_file() if config.full else saved.is_dir()):
        last = run.last_checkpoint()
        hint = f"; resume it with `moreft train --config {run.config} --resume`" if last else ""
        raise moreft.AdapterFileError(f"{str(run.path)!r} has no {saved.name}: the run did not finish{hint}")
    task = get_task(config.task, **config.task_options)
    model, tokenizer = load_base(config, task)
    metrics = read_json_file(run.metrics, "metrics file") if run.metrics.is_file() else {}
    check_init_digest(model, metrics if isinstance(metrics, dict) else {}, run.path)
    if config.full:
        load_full_weights(model, saved)
        model.eval()
        return config, task, model, tokenizer
    from moreft.train.reinit import MERGED_BASE_FILE, apply_merged_base

    if (run.path / MERGED_BASE_FILE).is_file():  # a merge_every run: earlier cycles live in the base weights
        apply_merged_base(model, run.path / MERGED_BASE_FILE)
    if config.method == "peft":
        from moreft.train.peft_arm import load_model

        model = load_model(model, run.adapter)
    else:
        moreft.load_adapter(model, run.adapter, check_base=False)
    model.eval()
    return config, task, model, tokenizer
