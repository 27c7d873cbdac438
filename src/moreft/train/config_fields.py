"""The first half of the run settings: data, adapter, training and evaluation/logging fields.

:class:`~moreft.train.config.TrainConfig` extends :class:`TrainSettingsBase` with the run-folder and
remaining training fields and the validation; split out only to keep each module small. Field order
(and so flag, docs and ``to_dict`` order) is this class's fields first, then TrainConfig's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.trainer_utils import SchedulerType

from moreft.tasks.base import EVAL_FRACTION, MAX_EVAL_FRACTION
from moreft.train.choices import Precision, RunMethod
from moreft.train.settings import Group, adapter_setting, setting
from moreft.train.value_checks import MAX_SEED

_A, _D, _T, _R = Group.ADAPTER, Group.DATA, Group.TRAINING, Group.RUN


@dataclass(frozen=True, kw_only=True)
class TrainSettingsBase:
    """The leading fields of :class:`~moreft.train.config.TrainConfig` (declared here; see there)."""

    task: str = setting(group=_D, help="Task name, e.g. sentiment (the tasks of moreft.tasks).")
    task_options: dict[str, Any] = setting(
        {},
        group=_D,
        flag="--task-option",
        help="Options of the task, e.g. source=movie.",
    )
    model: str | None = setting(
        None,
        group=_D,
        help=(
            "minilm, smollm2, llama-tiny or llama-250m (LLaMAs with random weights from the seed, for pretraining), "
            "or a local model directory or .gguf file; none picks the packaged default for the task's kind (minilm "
            "for classification, smollm2 for generation, llama-tiny for pretraining)."
        ),
    )
    method: str = setting(
        RunMethod.MORE.value,
        group=_A,
        choices=RunMethod,
        searched=True,
        help=(
            "What trains: an adapter, MoRe (more), MoRA (mora) or LoRA (lora); every base parameter (full: full "
            "fine-tuning; the adapter settings and merge_every do not apply); or peft: any peft method (peft_type, "
            "peft_options)."
        ),
    )
    peft_type: str | None = setting(
        None,
        group=_A,
        searched=True,
        help=(
            "Method peft: the peft method, a PEFT type of the installed peft in any case (e.g. vera, boft, hira, miss, "
            "gralora, c3a, lora); not prompt-learning types nor moreft's own."
        ),
    )
    peft_options: dict[str, Any] = setting(
        {},
        group=_A,
        flag="--peft-option",
        searched=True,
        help=(
            "Method peft: options of peft's config class for peft_type, e.g. r=256, converted by its field types; "
            "target_modules come from target_modules and the head is trained in full, as for moreft's methods."
        ),
    )
    block_rank: int = adapter_setting("block_rank", minimum=1, searched=True, primary=True)
    nblocks: int = adapter_setting("nblocks", minimum=1, searched=True)
    rank: int = adapter_setting("rank", minimum=1, searched=True, primary=True)
    alpha: float | None = adapter_setting("alpha", minimum=0, above=True)
    r_hat: int | None = adapter_setting("r_hat", minimum=1, searched=True)
    operator: str = adapter_setting("operator", searched=True)
    sharing_layout: str = adapter_setting("sharing_layout")
    target_modules: tuple[str, ...] | str | None = adapter_setting(
        "target_modules",
        help=(
            "Modules to adapt: names (exact or dotted suffix; several separated by spaces or commas, e.g. "
            "'query value'), one regex matched against the whole module name, all-linear (every linear layer but "
            "the output head), or none for the model's default."
        ),
    )
    dropout: float = adapter_setting("dropout", minimum=0, maximum=1.0, below=True)
    composition: str = adapter_setting("composition")
    learnable_scale: bool = adapter_setting("learnable_scale")
    scale_init: float = adapter_setting("scale_init")
    init_mode: str = adapter_setting("init_mode")
    lr: float = setting(
        3e-4,
        group=_T,
        minimum=0,
        above=True,
        searched=True,
        trainer_keys=("learning_rate",),
        help="Peak learning rate.",
    )
    lr_scheduler: str = setting(
        SchedulerType.COSINE.value,
        group=_T,
        choices=SchedulerType,
        trainer_keys=("lr_scheduler_type",),
        help="Learning-rate schedule (transformers' schedules; options of one go in "
        "trainer_args lr_scheduler_kwargs).",
    )
    batch_size: int = setting(
        16,
        group=_T,
        minimum=1,
        searched=True,
        trainer_keys=("per_device_train_batch_size",),
        help="Examples per device per micro-batch.",
    )
    eval_batch_size: int | None = setting(
        None,
        group=_R,
        minimum=1,
        resumable=True,
        trainer_keys=("per_device_eval_batch_size",),
        help="Examples per evaluation batch (none: twice batch_size).",
    )
    epochs: float = setting(
        1.0,
        group=_T,
        minimum=0,
        above=True,
        resumable=True,
        trainer_keys=("num_train_epochs",),
        help="Training epochs (may be fractional); ignored when max_steps is set.",
    )
    max_steps: int | None = setting(
        None,
        group=_T,
        minimum=1,
        resumable=True,
        trainer_keys=("max_steps",),
        help="Optimizer steps; overrides epochs (none: train for epochs).",
    )
    warmup_ratio: float = setting(
        0.0,
        group=_T,
        minimum=0,
        maximum=1.0,
        below=True,
        help="Linear warmup as a fraction of all steps (give this or warmup_steps).",
    )
    warmup_steps: int = setting(
        0, group=_T, minimum=0, trainer_keys=("warmup_steps",), help="Linear warmup in optimizer steps."
    )
    weight_decay: float = setting(
        0.0, group=_T, minimum=0, trainer_keys=("weight_decay",), help="AdamW weight decay."
    )
    grad_accum: int = setting(
        1,
        group=_T,
        minimum=1,
        trainer_keys=("gradient_accumulation_steps",),
        help="Micro-batches per optimizer step.",
    )
    group_by_length: bool = setting(
        False,
        group=_T,
        trainer_keys=("train_sampling_strategy",),
        help=(
            "Batch examples of similar length together (less padding, faster on CPU; the order stays random "
            "between batches)."
        ),
    )
    max_grad_norm: float = setting(
        1.0,
        group=_T,
        minimum=0,
        trainer_keys=("max_grad_norm",),
        help="Gradient clipping norm (0 disables clipping).",
    )
    seed: int = setting(
        0,
        group=_T,
        minimum=0,
        maximum=MAX_SEED,
        trainer_keys=("seed",),
        help="Seed of the data split, the adapter and head initialisation, and the data order.",
    )
    max_length: int = setting(
        128, group=_D, minimum=8, help="Token cap per example (prompt and answer for generation)."
    )
    max_new_tokens: int = setting(
        32, group=_D, minimum=1, help="Greedy generation length at evaluation (generation tasks)."
    )
    precision: str = setting(
        Precision.FP32.value,
        group=_T,
        choices=Precision,
        trainer_keys=("bf16", "fp16", "bf16_full_eval", "fp16_full_eval"),
        help="fp32, or bf16 (base weights in bf16 with autocast; adapters stay fp32).",
    )
    max_examples: int | None = setting(
        None,
        group=_D,
        minimum=3,
        help="Cap on the examples drawn from the task before splitting (none: all).",
    )
    eval_fraction: float = setting(
        EVAL_FRACTION,
        group=_D,
        minimum=0,
        above=True,
        maximum=MAX_EVAL_FRACTION,
        help=(
            "Share of the examples in each of validation and test when a task is split with the seed (0.1: "
            "80/10/10; 0.25: 50/25/25, larger test sets); tasks with given evaluation files ignore it."
        ),
    )
    eval_examples: int | None = setting(
        None, group=_D, minimum=1, help="Cap on the validation and test examples evaluated (none: all)."
    )
    best_checkpoint: bool = setting(
        False,
        group=_T,
        trainer_keys=("load_best_model_at_end", "metric_for_best_model", "greater_is_better"),
        help=(
            "At the end, load the checkpoint with the best validation metric (transformers' load_best_model_at_end) "
            "before the final validation and test scores; needs eval_every, and save_every equal to it (every "
            "evaluated step is kept as a candidate)."
        ),
    )
    eval_every: int | None = setting(
        None,
        group=_R,
        minimum=1,
        resumable=True,
        trainer_keys=("eval_strategy", "eval_steps"),
        help="Evaluate every N optimizer steps (none: only at the end).",
    )
    save_every: int | None = setting(
        None,
        group=_R,
        minimum=1,
        resumable=True,
        trainer_keys=("save_strategy", "save_steps"),
        help="Checkpoint every N optimizer steps, for --resume (none: no checkpoints).",
    )
    keep_checkpoints: int = setting(
        2,
        group=_R,
        minimum=1,
        resumable=True,
        trainer_keys=("save_total_limit",),
        help="How many checkpoints to keep (older ones are deleted).",
    )
    log_every: int = setting(
        10,
        group=_R,
        minimum=1,
        resumable=True,
        trainer_keys=("logging_strategy", "logging_steps"),
        help="Log loss and learning rate every N optimizer steps.",
    )
