"""The run config: one typed, frozen dataclass with every value of a training run visible.

Precedence is ``TrainConfig`` defaults < recipe YAML (``--config``) < command-line flags; see
:mod:`moreft.train.recipes` for reading recipes. The resolved config is saved as
``runs/<name>/config.yaml`` and ``TrainConfig.from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moreft.config import AdapterConfig, LoRAConfig, Method, MoRAConfig, MoReConfig, coerce_enum
from moreft.errors import ConfigError
from moreft.train.fields import check_folder_name, coerce_field

METHODS = tuple(m.value for m in Method)
PRECISIONS = ("fp32", "bf16")
NONFINITE = ("stop", "skip")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
MERGE_SCHEDULES = ("jagged", "official")
MERGE_CYCLES = ("alternate", "four")

#: Fields that may change when a run is resumed (they do not change what is learned so far).
RESUMABLE_CHANGES = frozenset({"resume", "nonfinite", "overwrite", "max_steps", "epochs", "eval_every", "save_every",
                               "log_every", "keep_checkpoints", "eval_batch_size", "progress"})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a ``moreft train`` run needs; validated on construction.

    Attributes:
        task: Task name (``moreft.tasks.TASKS``), e.g. ``"sentiment"``.
        task_options: Options of the task, e.g. ``{"source": "movie"}``.
        model: ``"minilm"``, ``"smollm2"`` or a local model directory / ``.gguf`` file; None picks
            the packaged default for the task's kind (minilm for classification, smollm2 for generation).
        method: ``"more"``, ``"mora"`` or ``"lora"``.
        block_rank: MoRe rank of each block.
        nblocks: MoRe number of blocks.
        rank: LoRA rank; MoRA's LoRA-parity rank (sets ``r_hat`` when ``r_hat`` is None).
        alpha: LoRA scaling numerator (scale ``alpha / rank``).
        r_hat: MoRA square size; None derives it from ``rank``.
        operator: MoRA compress/decompress operator (truncation, sharing, decouple, rotation).
        sharing_layout: MoRA ``sharing`` groups: ``strided`` or ``adjacent`` (the paper's r=256 setup).
        target_modules: Modules to adapt: names, a regex, ``"all-linear"``, or None for the
            model's default.
        dropout: Dropout inside the adapter branch.
        lr: Peak learning rate.
        lr_scheduler: ``cosine`` (default), ``linear``, ``constant`` or ``constant_with_warmup``.
        batch_size: Examples per device per micro-batch.
        eval_batch_size: Examples per evaluation batch (None: ``2 * batch_size``).
        epochs: Training epochs (may be fractional); ignored when ``max_steps`` is set.
        max_steps: Optimizer steps; overrides ``epochs``.
        warmup_ratio: Linear warmup as a fraction of all steps (exclusive with ``warmup_steps``).
        warmup_steps: Linear warmup in optimizer steps.
        weight_decay: AdamW weight decay.
        grad_accum: Micro-batches per optimizer step.
        group_by_length: Batch examples of similar length together (less padding, faster on CPU;
            the order stays random between batches).
        max_grad_norm: Gradient clipping norm (0 disables clipping).
        seed: Seed of the data split, the adapter/head initialisation and the data order.
        max_length: Token cap per example (prompt + answer for generation).
        max_new_tokens: Greedy generation length at evaluation (generation tasks).
        precision: ``fp32``, or ``bf16`` (base weights in bf16, autocast; adapters stay fp32).
        max_examples: Cap on the examples drawn from the task before splitting.
        eval_examples: Cap on the validation/test examples evaluated (None: all).
        eval_every: Evaluate every N optimizer steps (None: only at the end).
        save_every: Checkpoint every N optimizer steps for ``resume`` (None: no checkpoints).
        keep_checkpoints: How many checkpoints to keep (older ones are deleted).
        log_every: Log loss and learning rate every N optimizer steps.
        output_dir: Parent of run directories.
        run_name: Run directory name (None: ``<task>-<model>-<method>-seed<seed>``); ``{field}``
            placeholders are filled from this config, e.g. ``glue-cola-seed{seed}``.
        resume: Continue from the last checkpoint in the run directory.
        overwrite: Delete an existing run directory and start over.
        progress: Show a progress bar.
        nonfinite: A NaN/Inf loss or gradient ``stop``s the run (keeping the last good checkpoint) or
            ``skip``s that optimizer step (:mod:`moreft.train.nonfinite`).
        merge_every: Every N optimizer steps merge each adapter into its base weight and re-initialise it
            (ReLoRA / ReMoRA, :mod:`moreft.train.reinit`); None: never.
        merge_warmup: Learning-rate warmup steps after each merge (None: ``min(50, merge_every // 10)``,
            or 50 with ``merge_schedule: official``).
        merge_schedule: ``jagged`` (the run's schedule times a warmup ramp after each merge; adapter
            optimizer state dropped) or ``official`` (kongds/MoRA: the schedule restarts from the
            current lr with a warmup and decays over the remaining steps; all optimizer state dropped).
        merge_cycle: MoRA sharing groupings at each merge: ``alternate`` (mora_type 1 <-> 2) or
            ``four`` (the authors' default ReMoRA cycle 1 -> 2 -> 3 -> 4).
        r_hat_rounding: MoRA square size from ``rank``: ``floor`` (paper) or ``round`` (authors' code).
        cap_r_hat: Cap MoRA sharing's square size at ``min(in, out)`` (the authors' code does not).
        sharing_output_layout: MoRA sharing output grouping when it differs from ``sharing_layout``
            (``strided`` / ``adjacent``; the authors' mora_type 3 and 4).
        block_rule: MoRe block shapes: ``moreft``, ``official`` or ``official-int`` (the MoRe repository's).
    """

    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    method: str = "more"
    block_rank: int = 4
    nblocks: int = 4
    rank: int = 8
    alpha: float = 16.0
    r_hat: int | None = None
    operator: str = "rotation"
    sharing_layout: str = "strided"
    target_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    lr: float = 3e-4
    lr_scheduler: str = "cosine"
    batch_size: int = 16
    eval_batch_size: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    group_by_length: bool = False
    max_grad_norm: float = 1.0
    seed: int = 0
    max_length: int = 128
    max_new_tokens: int = 32
    precision: str = "fp32"
    max_examples: int | None = None
    eval_examples: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    output_dir: str = "runs"
    run_name: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    nonfinite: str = "stop"
    merge_every: int | None = None
    merge_warmup: int | None = None
    merge_schedule: str = "jagged"
    merge_cycle: str = "alternate"
    r_hat_rounding: str = "floor"
    cap_r_hat: bool = True
    sharing_output_layout: str | None = None
    block_rule: str = "moreft"

    def __post_init__(self) -> None:
        if self.model is None and isinstance(self.task, str):
            object.__setattr__(self, "model", default_model(self.task))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce_field(f.name, getattr(self, f.name)))
        default_model(self.task)  # checks the task name
        from moreft.tasks import get_task

        get_task(self.task, **self.task_options)  # checks the task's options now, before any loading
        _check_choice("method", self.method, METHODS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_choice("sharing_layout", self.sharing_layout, ("strided", "adjacent"))
        _check_choice("nonfinite", self.nonfinite, NONFINITE)
        _check_choice("merge_schedule", self.merge_schedule, MERGE_SCHEDULES)
        _check_choice("merge_cycle", self.merge_cycle, MERGE_CYCLES)
        if self.merge_warmup is not None and (self.merge_every is None or (
                self.merge_warmup >= self.merge_every and self.merge_schedule != "official")):
            raise ConfigError(f"merge_warmup={self.merge_warmup} needs merge_every > merge_warmup "
                              f"(merge_every={self.merge_every})")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps} are both "
                              "set; give only one of them")
        if self.resume and self.overwrite:
            raise ConfigError("resume=True and overwrite=True contradict each other; give only one")
        if self.run_name is not None and "{" in self.run_name:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run_name"}
            try:
                object.__setattr__(self, "run_name", self.run_name.format(**values))
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"run_name={self.run_name!r}: each {{...}} must name a config field, e.g. "
                                  f"'glue-cola-seed{{seed}}' ({type(exc).__name__}: {exc})") from None
        if self.run_name is None:
            model = Path(self.model).name.removesuffix(".gguf") or "model"
            object.__setattr__(self, "run_name", f"{self.task}-{model}-{self.method}-seed{self.seed}")
        check_folder_name("run_name", self.run_name)
        self.adapter_config()  # validates the method's hyperparameters now, not after model loading

    @property
    def run_dir(self) -> Path:
        """``output_dir / run_name``."""
        return Path(self.output_dir) / str(self.run_name)

    def adapter_config(self, target_modules: Any = None, modules_to_save: tuple[str, ...] = ()) -> AdapterConfig:
        """The moreft adapter config this run injects.

        Args:
            target_modules: Used when ``self.target_modules`` is None (the model's default).
            modules_to_save: Modules trained in full, e.g. the classification head.

        Raises:
            ConfigError: A method hyperparameter is invalid (e.g. an odd ``r_hat`` for rotation).
        """
        common = {"target_modules": self.target_modules if self.target_modules is not None else target_modules,
                  "modules_to_save": tuple(modules_to_save), "dropout": self.dropout}
        method = coerce_enum(Method, self.method, "method")
        if method is Method.MORE:
            return MoReConfig(nblocks=self.nblocks, block_rank=self.block_rank, block_rule=self.block_rule, **common)
        if method is Method.MORA:
            return MoRAConfig(rank=self.rank, r_hat=self.r_hat, operator=self.operator,
                              sharing_layout=self.sharing_layout, sharing_output_layout=self.sharing_output_layout,
                              r_hat_rounding=self.r_hat_rounding, cap_r_hat=self.cap_r_hat, **common)
        return LoRAConfig(rank=self.rank, alpha=self.alpha, **common)

    def method_label(self) -> str:
        """A short label with the method's size hyperparameters, e.g. ``more:block_rank=4``."""
        if self.method == "more":
            extra = f",nblocks={self.nblocks}" if self.nblocks != 4 else ""
            return f"more:block_rank={self.block_rank}{extra}"
        if self.method == "mora":
            return f"mora:rank={self.rank}" + (f",r_hat={self.r_hat}" if self.r_hat else "")
        return f"lora:rank={self.rank}"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values, in field order (``from_dict`` reverses it)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, dict)
                                                                          else value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a mapping of field values.

        Raises:
            ConfigError: Unknown keys (the message lists the valid ones), a missing ``task`` or
                ``model``, or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run config must be a mapping of field: value, got {type(data).__name__}")
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {field_names()}")
        if data.get("task") is None:
            raise ConfigError(f"the run config needs a task (e.g. --task sentiment); tasks: {task_names()}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied and validated again."""
        data = self.to_dict()
        data.update(changes)
        if "run_name" not in changes and any(k in changes for k in ("task", "model", "method", "seed")):
            data["run_name"] = None
        return TrainConfig.from_dict(data)


def task_names() -> list[str]:
    """Valid task names."""
    from moreft.tasks import TASKS

    return sorted(TASKS)


def default_model(task: str) -> str:
    """The packaged model for a task's kind: ``minilm`` (classification) or ``smollm2`` (generation).

    Raises:
        ConfigError: ``task`` is not a known task.
    """
    from moreft.tasks import TASKS, TaskKind

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid tasks are {task_names()}")
    return "minilm" if TASKS[task].kind is TaskKind.CLASSIFICATION else "smollm2"


def field_names() -> list[str]:
    """Names of every :class:`TrainConfig` field, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")
