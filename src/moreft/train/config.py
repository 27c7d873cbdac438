"""The run config: one typed, frozen dataclass with every value of a training run visible.

Precedence is ``TrainConfig`` defaults < recipe YAML (``--config``) < command-line flags; see
:mod:`moreft.train.recipes` for reading recipes. The resolved config is saved as
``runs/<name>/config.yaml`` and ``TrainConfig.from_dict`` reads it back.

Each field is declared once, with its meaning, rule and role (:mod:`moreft.train.settings`); the
flags, recipe checks, compare / search / resume rules and docs/settings.md are derived from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moreft.config import CONFIG_CLASSES, AdapterConfig, Method
from moreft.errors import ConfigError
from moreft.remora import RemoraCycle
from moreft.train.choices import MergeSchedule, NonFinitePolicy, RunMethod
from moreft.train.config_fields import TrainSettingsBase
from moreft.train.settings import Group, adapter_setting, coerce, setting, specs
from moreft.train.trainer_args import check_trainer_args
from moreft.train.value_checks import check_folder_name

_A, _D, _T, _R = Group.ADAPTER, Group.DATA, Group.TRAINING, Group.RUN


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainSettingsBase):
    """Everything a ``moreft train`` run needs; validated on construction.

    Each field's meaning, type, default and rule are declared with it below (``setting(...)``);
    docs/settings.md lists them all, and ``moreft train --help`` shows them.
    """

    output_dir: str = setting(
        "runs", group=_R, trainer_keys=("output_dir",), help="Parent of run directories."
    )
    run_name: str | None = setting(
        None,
        group=_R,
        searched=True,
        trainer_keys=("run_name",),
        help=(
            "Run directory name (none: <task>-<model>-<method>-seed<seed>); {field} placeholders are filled from "
            "this config, e.g. glue-cola-seed{seed}."
        ),
    )
    resume: bool = setting(
        False,
        group=_R,
        resumable=True,
        searched=True,
        trainer_keys=("resume_from_checkpoint",),
        help="Continue from the last checkpoint in the run directory.",
    )
    overwrite: bool = setting(
        False,
        group=_R,
        resumable=True,
        searched=True,
        help="Delete an existing run directory and start over.",
    )
    progress: bool = setting(
        True, group=_R, resumable=True, trainer_keys=("disable_tqdm",), help="Show a progress bar."
    )
    nonfinite: str = setting(
        NonFinitePolicy.STOP.value,
        group=_T,
        choices=NonFinitePolicy,
        resumable=True,
        help=(
            "A NaN/Inf loss or gradient stops the run (keeping the last good checkpoint) or skips that optimizer "
            "step."
        ),
    )
    merge_every: int | None = setting(
        None,
        group=_T,
        minimum=1,
        help=(
            "Every N optimizer steps merge each adapter into its base weight and re-initialise it (ReLoRA / "
            "ReMoRA); none: never."
        ),
    )
    merge_warmup: int | None = setting(
        None,
        group=_T,
        minimum=0,
        help=(
            "Learning-rate warmup steps after each merge (none: min(50, merge_every / 10), or 50 with "
            "merge_schedule official)."
        ),
    )
    merge_schedule: str = setting(
        MergeSchedule.JAGGED.value,
        group=_T,
        choices=MergeSchedule,
        help=(
            "jagged: the run's schedule times a warmup ramp after each merge (adapter optimizer state dropped); "
            "official (kongds/MoRA): the schedule restarts from the current lr with a warmup and decays over the "
            "remaining steps (all optimizer state dropped)."
        ),
    )
    merge_cycle: str = setting(
        RemoraCycle.ALTERNATE.value,
        group=_T,
        choices=RemoraCycle,
        help=(
            "MoRA sharing groupings at each merge: alternate (mora_type 1 <-> 2) or four (the authors' default "
            "ReMoRA cycle 1 -> 2 -> 3 -> 4)."
        ),
    )
    train_unadapted: bool = setting(
        False,
        group=_T,
        help=(
            "Also train in full every parameter outside the adapted layers (embeddings, norms, output head) and "
            "save it with the adapter: the setup of pretraining from a random base (ReLoRA; MoRA Section 5.3)."
        ),
    )
    r_hat_rounding: str = adapter_setting("r_hat_rounding")
    cap_r_hat: bool = adapter_setting("cap_r_hat")
    sharing_output_layout: str | None = adapter_setting("sharing_output_layout")
    block_rule: str = adapter_setting("block_rule")
    trainer_args: dict[str, Any] = setting(
        {},
        group=_T,
        flag="--trainer-arg",
        parse=lambda n, v: check_trainer_args(n, v, specs(TrainConfig)),
        help=(
            "Other transformers TrainingArguments options, passed through and checked by their own types, e.g. "
            "report_to=tensorboard, optim=adafactor, gradient_checkpointing=true; options moreft sets from its "
            "own settings are refused."
        ),
    )

    def __post_init__(self) -> None:
        if self.model is None and isinstance(self.task, str):
            object.__setattr__(self, "model", default_model(self.task))
        for name, spec in specs(TrainConfig).items():
            object.__setattr__(self, name, coerce(spec, getattr(self, name)))
        default_model(self.task)  # checks the task name
        from moreft.tasks import get_task

        get_task(self.task, **self.task_options)  # checks the task's options now, before any loading
        if self.full and self.merge_every is not None:
            raise ConfigError(
                f"merge_every={self.merge_every} merges an adapter into its base weights; method "
                "full trains the weights themselves and has no adapter to merge (drop merge_every)"
            )
        if self.merge_warmup is not None and (
            self.merge_every is None
            or (self.merge_warmup >= self.merge_every and self.merge_schedule != MergeSchedule.OFFICIAL)
        ):
            raise ConfigError(
                f"merge_warmup={self.merge_warmup} needs merge_every > merge_warmup "
                f"(merge_every={self.merge_every})"
            )
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError(
                f"warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps} are both "
                "set; give only one of them"
            )
        if self.best_checkpoint and (not self.eval_every or self.save_every != self.eval_every):
            raise ConfigError(
                f"best_checkpoint=True needs a checkpoint at every evaluation: eval_every set and "
                f"save_every equal to it (got eval_every={self.eval_every}, save_every={self.save_every})"
            )
        self._check_peft()
        if self.resume and self.overwrite:
            raise ConfigError("resume=True and overwrite=True contradict each other; give only one")
        if self.run_name is not None and "{" in self.run_name:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run_name"}
            try:
                object.__setattr__(self, "run_name", self.run_name.format(**values))
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"run_name={self.run_name!r}: each {{...}} must name a config field, e.g. "
                    f"'glue-cola-seed{{seed}}' ({type(exc).__name__}: {exc})"
                ) from None
        if self.run_name is None:
            model = Path(self.model).name.removesuffix(".gguf") or "model"
            method = f"peft-{self.peft_type}" if self.method == RunMethod.PEFT else self.method
            object.__setattr__(self, "run_name", f"{self.task}-{model}-{method}-seed{self.seed}")
        check_folder_name("run_name", self.run_name)
        if not self.full and self.method != RunMethod.PEFT:
            self.adapter_config()  # validates the method's hyperparameters now, not after model loading

    @property
    def full(self) -> bool:
        """True for full fine-tuning (``method: full``): no adapter, every base parameter trains."""
        return self.method == RunMethod.FULL.value

    def _check_peft(self) -> None:
        """Normalise ``peft_type`` / ``peft_options`` of a peft arm (peft's own checks run); refuse them elsewhere."""
        if self.method == RunMethod.PEFT:
            from moreft.train.peft_arm import check_peft

            if self.merge_every is not None:
                raise ConfigError(
                    f"merge_every={self.merge_every} (ReLoRA / ReMoRA) merges moreft's own adapters; "
                    "method peft cannot use it"
                )
            name, options = check_peft(self.peft_type, self.peft_options)
            object.__setattr__(self, "peft_type", name)
            object.__setattr__(self, "peft_options", options)
        elif self.peft_type is not None or self.peft_options:
            raise ConfigError(
                f"peft_type={self.peft_type!r}, peft_options={self.peft_options!r} are for method "
                f"peft, not method {self.method!r}; set method: peft or leave them out"
            )

    @property
    def run_dir(self) -> Path:
        """``output_dir / run_name``."""
        return Path(self.output_dir) / str(self.run_name)

    def adapter_config(
        self, target_modules: Any = None, modules_to_save: tuple[str, ...] = ()
    ) -> AdapterConfig:
        """The moreft adapter config this run injects.

        Args:
            target_modules: Used when ``self.target_modules`` is None (the model's default).
            modules_to_save: Modules trained in full, e.g. the classification head.

        Raises:
            ConfigError: A method hyperparameter is invalid (e.g. an odd ``r_hat`` for rotation), or the
                method is ``full`` (no adapter) or ``peft`` (whose config is peft's own:
                :mod:`moreft.train.peft_arm`).
        """
        if self.full:
            raise ConfigError("method full trains every base parameter and has no adapter config")
        if self.method == RunMethod.PEFT:
            raise ConfigError(
                f"method peft ({self.method_label()}) has no moreft adapter config; it is peft's own "
                "(moreft.train.peft_arm)"
            )
        method = Method(self.method)
        own = {f.name: f.default for f in dataclasses.fields(CONFIG_CLASSES[method])}
        # a setting left at None takes the method's own default where that is not None (alpha)
        values = {
            name: value
            for name in adapter_fields(method)
            if (value := getattr(self, name)) is not None or own.get(name) is None
        }
        if self.target_modules is None:
            values["target_modules"] = target_modules
        return CONFIG_CLASSES[method](modules_to_save=tuple(modules_to_save), **values)

    def method_label(self) -> str:
        """The method and its hyperparameters, e.g. ``more:block_rank=4`` or ``lora:rank=8,alpha=32.0``.

        A method's primary size (``block_rank``, ``rank``) is always shown; its other settings
        (not those every method shares) when they differ from their default. Full fine-tuning is ``full``;
        a peft arm: ``peft:vera:r=256``.
        """
        if self.full:
            return RunMethod.FULL.value
        if self.method == RunMethod.PEFT:
            from moreft.train.peft_arm import label

            return label(str(self.peft_type), self.peft_options)
        method = Method(self.method)
        shown = [
            f"{s.name}={getattr(self, s.name)}"
            for s in specs(TrainConfig).values()
            if method in s.methods and (s.primary or getattr(self, s.name) != s.default)
        ]
        return f"{method.value}:" + ",".join(shown)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values, in field order (``from_dict`` reverses it)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                list(value)
                if isinstance(value, tuple)
                else (dict(value) if isinstance(value, dict) else value)
            )
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
    """The packaged model for a task's kind: ``minilm`` (classification), ``smollm2`` (generation) or
    ``llama-tiny`` (language modelling: a small LLaMA trained from scratch).

    Raises:
        ConfigError: ``task`` is not a known task.
    """
    from moreft.tasks import TASKS, TaskKind

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid tasks are {task_names()}")
    return {TaskKind.CLASSIFICATION: "minilm", TaskKind.LANGUAGE_MODELING: "llama-tiny"}.get(
        TASKS[task].kind, "smollm2"
    )


def field_names() -> list[str]:
    """Names of every :class:`TrainConfig` field, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def adapter_fields(method: Method) -> list[str]:
    """The settings that go into ``method``'s adapter config (its own and those every method shares)."""
    return [
        s.name
        for s in specs(TrainConfig).values()
        if s.group is Group.ADAPTER
        and s.name not in ("method", *PEFT_SETTINGS)
        and (not s.methods or method in s.methods)
    ]


#: The settings of a peft arm (method peft), which moreft's own adapter configs do not have.
PEFT_SETTINGS = ("peft_type", "peft_options")


#: Settings that choose the adapter (the method and every adapter config field).
ADAPTER_SETTINGS = frozenset(s.name for s in specs(TrainConfig).values() if s.group is Group.ADAPTER)
#: Settings that may change when a run is resumed (they do not change what is learned so far).
RESUMABLE_CHANGES = frozenset(s.name for s in specs(TrainConfig).values() if s.resumable)
#: Settings ``moreft search`` sets for each trial (so it has no flag for them).
SEARCHED_SETTINGS = tuple(s.name for s in specs(TrainConfig).values() if s.searched)
