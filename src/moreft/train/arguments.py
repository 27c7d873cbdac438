"""A run's ``transformers.TrainingArguments``, built from its :class:`~moreft.train.config.TrainConfig`."""

from __future__ import annotations

from typing import Any

import torch

from moreft.errors import ConfigError
from moreft.tasks import MetricGoal, get_task
from moreft.train.choices import Precision
from moreft.train.config import TrainConfig
from moreft.train.trainer import CHECKPOINTS_DIR
from moreft.train.trainer_args import check_reporting, check_scheduler


def training_arguments(config: TrainConfig) -> Any:
    """The ``transformers.TrainingArguments`` of a run: moreft's settings, then ``config.trainer_args``.

    The keys set here from a setting are that setting's ``trainer_keys`` (so ``trainer_args`` cannot
    set them); the others are :data:`~moreft.train.trainer_args.FIXED`, or defaults ``trainer_args``
    may change (no reporting, single-process data loading).

    Raises:
        ConfigError: transformers refuses the combination (e.g. an option ``trainer_args`` added), or a
            ``report_to`` integration is not installed.
    """
    from transformers import TrainingArguments

    task = get_task(
        config.task, **config.task_options
    )  # best_checkpoint: its metric, and which way is better
    values = {
        "output_dir": str(config.run_dir / CHECKPOINTS_DIR),
        "run_name": config.run_name,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size or 2 * config.batch_size,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "learning_rate": config.lr,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio or config.warmup_steps,
        "weight_decay": config.weight_decay,
        "gradient_accumulation_steps": config.grad_accum,
        "train_sampling_strategy": "group_by_length" if config.group_by_length else "random",
        "max_grad_norm": config.max_grad_norm,
        "bf16": config.precision == Precision.BF16,
        "seed": config.seed,
        "logging_strategy": "steps",
        "logging_steps": config.log_every,
        "eval_strategy": "steps" if config.eval_every else "no",
        "eval_steps": config.eval_every,
        "save_strategy": "steps" if config.save_every else "no",
        "save_steps": config.save_every or 500,
        "save_total_limit": config.keep_checkpoints,
        "load_best_model_at_end": config.best_checkpoint,
        "metric_for_best_model": task.metric_name if config.best_checkpoint else None,
        "greater_is_better": task.metric_goal is MetricGoal.MAXIMIZE if config.best_checkpoint else None,
        "disable_tqdm": True,  # moreft's own progress bar (progress)
        "report_to": "none",
        "push_to_hub": False,
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": not torch.accelerator.is_available(),  # torchrun on CPU: DDP over gloo (accelerate MULTI_CPU)
    }
    values.update(config.trainer_args)
    check_reporting(values["report_to"])
    try:
        arguments = TrainingArguments(**values)
    except (ValueError, TypeError, ImportError) as exc:
        given = f" with trainer_args {config.trainer_args}" if config.trainer_args else ""
        raise ConfigError(f"transformers refused this run's training arguments{given}: {exc}") from None
    check_scheduler(arguments)
    return arguments
