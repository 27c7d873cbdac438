"""``moreft.train.train(config)``: one training run from a :class:`TrainConfig` to a run directory: an
adapter on a frozen base, or (``method: full``) every base parameter."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import moreft
from moreft.errors import ConfigError
from moreft.lock import LOCK_NAME, folder_lock
from moreft.safe_write import atomic_write_text
from moreft.shapes import check_adapter_size
from moreft.tasks import TaskKind, get_task
from moreft.train import peft_arm
from moreft.train.arguments import training_arguments
from moreft.train.choices import RunMethod
from moreft.train.config import RESUMABLE_CHANGES, TrainConfig
from moreft.train.data import PadCollator, encode_blocks, encode_classification, encode_generation
from moreft.train.evaluate import evaluate, predict, score_predictions
from moreft.train.nonfinite import NonFiniteGuard
from moreft.train.peak_memory import peak_rss_mib, reset_peak_rss
from moreft.train.plots import plot_run
from moreft.train.predictions import prediction_records, write_predictions
from moreft.train.recipes import dump_config
from moreft.train.reinit import merge_callbacks
from moreft.train.rundir import (
    RunDir,
    check_max_length,
    check_run_owned,
    check_split,
    clear_run,
    is_main_process,
    load_base,
    model_defaults,
    precision_dtype,
    split_record,
)
from moreft.train.trainer import (
    AdapterTrainer,
    AtTrainBegin,
    MetricsLogger,
    ProgressBar,
    log_tensorboard_to,
    read_jsonl,
    truncate_jsonl,
    use_callbacks,
)
from moreft.train.weights import DIGEST_KEY, adapter_for, init_digest_of, save_full_weights

#: How each task kind's examples become training items.
ENCODERS = {
    TaskKind.CLASSIFICATION: encode_classification,
    TaskKind.GENERATION: encode_generation,
    TaskKind.LANGUAGE_MODELING: encode_blocks,
}


@dataclass(frozen=True)
class RunResult:
    """What :func:`train` produced.

    Attributes:
        run_dir: The run directory.
        metrics: The contents of ``metrics.json``.
        config: The resolved config.
    """

    run_dir: Path
    metrics: dict[str, Any]
    config: TrainConfig


def _say(message: str, quiet: bool) -> None:
    if not quiet and is_main_process():
        print(message, flush=True)


def prepare_run_dir(config: TrainConfig) -> Path | None:
    """Check the run directory against ``resume`` / ``overwrite``; return the checkpoint to resume.

    Nothing is deleted here: with ``overwrite`` the old run is removed by :func:`train` only once
    the new one is ready to start.

    Raises:
        ConfigError: The directory holds a run and neither ``resume`` nor ``overwrite`` is set, or
            ``resume`` is set and the saved config differs in a field that changes training.
        moreft.OutputError: ``overwrite`` is set and the directory holds files moreft did not write.
    """
    run = RunDir(config.run_dir)
    occupied = run.path.is_dir() and any(p.name != LOCK_NAME for p in run.path.iterdir())
    if not config.resume:
        if occupied and not config.overwrite and is_main_process():
            raise ConfigError(
                f"run directory {str(run.path)!r} already exists; pass --resume to continue it, "
                "--overwrite to start over, or choose another --run-name"
            )
        if occupied and config.overwrite and is_main_process():
            check_run_owned(run.path)
        return None
    if run.config.is_file():
        from moreft.train.rundir import read_run_config

        saved = read_run_config(run.path).to_dict()
        now = config.to_dict()
        differ = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if differ:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
            raise ConfigError(
                f"cannot resume {str(run.path)!r} with a different config ({diffs}); resume with "
                "the same settings, or use --overwrite / another --run-name"
            )
    return run.last_checkpoint()


def train(config: TrainConfig, callbacks: Sequence[Any] = (), quiet: bool = False) -> RunResult:
    """Fine-tune ``config.model`` with ``config.method`` on ``config.task`` and fill the run directory.

    Args:
        config: The resolved run config.
        callbacks: Extra ``transformers.TrainerCallback`` objects (e.g. to stop early in tests).
        quiet: Print nothing (progress bar and messages off).

    Returns:
        A :class:`RunResult`.

    Raises:
        ConfigError: Bad task options, model, hyperparameters or run directory state.
        moreft.tasks.DataPackageError: The task's or model's data package is not installed.
        moreft.errors.TrainingError: A NaN/Inf loss or gradient with ``nonfinite: stop`` (the default).
        moreft.OutputError: Another process is writing the run directory, or ``overwrite`` would
            delete files moreft did not write there.
    """
    if not is_main_process():  # rank 0 holds the run's lock for the whole launch
        return _train(config, callbacks, quiet)
    with folder_lock(config.run_dir, "run directory"):
        return _train(config, callbacks, quiet)


def _train(config: TrainConfig, callbacks: Sequence[Any], quiet: bool) -> RunResult:
    """:func:`train` inside the run directory's lock."""
    began = time.perf_counter()
    reset_peak_rss()  # metrics report this run's peak, also for several runs in one process
    run = RunDir(config.run_dir)
    checkpoint = prepare_run_dir(config)
    if config.resume:
        _say(
            f"resuming from {checkpoint}"
            if checkpoint
            else f"no checkpoint in {run.checkpoints}; starting from scratch",
            quiet,
        )
    _say(f"# run config ({run.config})\n" + dump_config(config), quiet)
    task = get_task(config.task, **config.task_options)
    splits = task.load(config.seed, config.max_examples, config.eval_fraction)
    keep_split = config.resume and check_split(run.path, config, splits)  # resume on the same data, or stop
    arguments = training_arguments(config)  # before the slow model load: a refused trainer_args stops here
    from transformers import set_seed

    set_seed(config.seed)  # the new head and the adapter are initialised from this seed
    model, tokenizer = load_base(config, task)
    check_max_length(config, model, task.kind)
    targets, heads = model_defaults(config.model, model, task.kind)
    if config.full:  # full fine-tuning: no adapter, every base parameter trains
        for p in model.parameters():
            p.requires_grad_(True)
        where = "every parameter"
    elif config.method == RunMethod.PEFT:  # any peft method, with peft's own classes (moreft.train.peft_arm)
        model, adapted = peft_arm.attach(
            model,
            str(config.peft_type),
            config.peft_options,
            config.target_modules or targets,
            heads,
            task.kind is TaskKind.CLASSIFICATION,
        )
        where = f"{len(adapted)} layers"
    else:
        adapter = adapter_for(config, model, targets, heads)
        check_adapter_size(model, adapter, moreft.resolve_targets(model, adapter))  # before allocating it
        moreft.inject(model, adapter)
        where = f"{len(moreft.adapter_layers(model))} layers"
    for p in model.parameters():  # optimizer state and updates in fp32 even on a bf16 base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    counts = (
        peft_arm.count_parameters(model)
        if config.method == RunMethod.PEFT
        else moreft.count_parameters(model)
    )
    _say(f"{config.method_label()} on {where}: {counts}", quiet)
    _say(f"{config.task}: {splits.sizes}", quiet)

    encode = ENCODERS[task.kind]
    eval_cap = slice(None, config.eval_examples)
    eval_sets = {"eval": splits.validation[eval_cap], "test": splits.test[eval_cap]}
    autocast = precision_dtype(config.precision) if config.precision != "fp32" else None
    eval_bs = config.eval_batch_size or 2 * config.batch_size

    predicted: dict[
        tuple[int, ...], list[Any]
    ] = {}  # the latest predictions per example set (test_predictions)

    def score(examples: Sequence[Any]) -> dict[str, float]:
        if (
            task.kind is TaskKind.LANGUAGE_MODELING
        ):  # perplexity over packed blocks: no per-example prediction
            return evaluate(
                model, tokenizer, task, examples, eval_bs, config.max_length, config.max_new_tokens, autocast
            )
        preds = predict(
            model, tokenizer, task, examples, eval_bs, config.max_length, config.max_new_tokens, autocast
        )
        predicted[tuple(ex.id for ex in examples)] = preds
        return score_predictions(task, examples, preds)

    train_dataset = encode(splits.train, tokenizer, config.max_length)

    # Every check has passed: only now is an old run (--overwrite) removed and the new one written, so a
    # run that cannot start (bad data, model or sizes) leaves the folder as it was.
    # A resumed run's own files change only once the Trainer has loaded and checked the checkpoint's
    # optimizer and scheduler state (on_train_begin comes after that), so a resume refused there
    # leaves the run as it was.
    def write_run_files() -> None:
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config, dump_config(config))
        if not keep_split:
            atomic_write_text(run.split, json.dumps(split_record(config, splits)) + "\n")
        if checkpoint is not None:
            truncate_jsonl(run.metrics_log, int(checkpoint.name.split("-")[-1]))
        elif run.metrics_log.exists():
            run.metrics_log.unlink()

    at_start = []
    if is_main_process():
        if config.overwrite and not config.resume:
            clear_run(run.path)
        if checkpoint is None:
            write_run_files()
        else:
            at_start = [AtTrainBegin(write_run_files)]
    trainer = AdapterTrainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        score=score,
        eval_sets=eval_sets,
        full_weights=config.full,
    )
    log_tensorboard_to(trainer, run.tensorboard)
    printers = [] if quiet else [ProgressBar(config.progress)]
    guard = NonFiniteGuard(config.nonfinite)  # before MetricsLogger: it adds nonfinite_skipped to the logs
    use_callbacks(
        trainer,
        [
            *at_start,
            guard,
            *merge_callbacks(config, run.path),
            MetricsLogger(run.metrics_log),
            *printers,
            *callbacks,
        ],
    )
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - start
    final = {**trainer.evaluate(metric_key_prefix="eval"), **trainer.evaluate(metric_key_prefix="test")}
    test_key = tuple(ex.id for ex in eval_sets["test"])
    test_predictions = (
        prediction_records(task, eval_sets["test"], predicted[test_key]) if test_key in predicted else None
    )

    metrics: dict[str, Any] = {
        "task": config.task,
        "model": config.model,
        "method": config.method,
        "label": config.method_label(),
        "seed": config.seed,
        "metric": task.metric_name,
        "metric_goal": task.metric_goal.value,
        "trainable_params": counts.trainable if config.full else counts.adapter,
        "other_trainable_params": 0 if config.full else counts.other_trainable,
        "total_params": counts.total,
        **final,
        "train_loss": float(output.training_loss),
        "global_step": int(trainer.state.global_step),
        "train_examples": len(splits.train),
        "eval_examples": len(eval_sets["eval"]),
        "test_examples": len(eval_sets["test"]),
        "train_seconds": round(train_seconds, 3),
        "resumed_from": checkpoint.name if checkpoint else None,
        "nonfinite_skipped": guard.skipped,
        "peak_rss_mb": round(peak_rss_mib(), 1),
    }
    if config.best_checkpoint:
        best = trainer.state.best_model_checkpoint
        metrics["best_step"] = int(Path(best).name.rpartition("-")[2]) if best else None
    if torch.cuda.is_available():
        metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if init_digest_of(model) is not None:  # a random base: eval / inspect rebuild it and check this
        metrics[DIGEST_KEY] = init_digest_of(model)
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(model)
        if config.full:
            save_full_weights(trained, run.model_weights, trainer.state.global_step)
        elif config.method == RunMethod.PEFT:
            peft_arm.save(trained, run.adapter)
        else:
            moreft.save_adapter(trained, run.adapter)
        if test_predictions is not None:
            write_predictions(run.test_predictions, test_predictions)
        atomic_write_text(run.metrics, json.dumps(metrics, indent=2) + "\n")
        plot_run(
            read_jsonl(run.metrics_log),
            task.metric_name,
            run.loss_plot,
            title=f"{config.run_name}: {config.method_label()}",
        )
    _say(summary(metrics, run, time.perf_counter() - began), quiet)
    return RunResult(run.path, metrics, config)


def summary(metrics: dict[str, Any], run: RunDir, total_seconds: float) -> str:
    """The closing lines of a run: scores, trainable parameters, time, where the adapter (weights) went."""
    name = metrics["metric"]
    head = metrics["other_trainable_params"]
    full = metrics["method"] == RunMethod.FULL.value
    params = (
        f"trainable parameters: all {metrics['trainable_params']:,} (full fine-tuning)"
        if full
        else f"trainable adapter parameters: {metrics['trainable_params']:,}"
        + (f" (not counted: {head:,} outside the adapter, trained in full)" if head else "")
    )
    return "\n".join(
        [
            f"validation {name} {metrics.get(f'eval_{name}', float('nan')):.4f} ({metrics['eval_examples']} examples), "
            f"test {name} {metrics.get(f'test_{name}', float('nan')):.4f} ({metrics['test_examples']} examples)",
            params,
            f"time: {metrics['train_seconds']:.1f} s training, {total_seconds:.1f} s in all",
            f"{'weights' if full else 'adapter'} saved to {run.model_weights if full else run.adapter} "
            f"(metrics.json and loss.png in {run.path})",
        ]
    )
