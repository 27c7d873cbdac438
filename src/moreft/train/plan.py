"""``moreft train --dry-run``: what a run would train, for how long, and on how many tokens, without running it.

The config is resolved and checked as for a real run, the training arguments are built (so a
``trainer_args`` transformers refuses is caught), and the model is built on the ``meta`` device
(:func:`moreft.models.model_skeleton`: no weights read, nothing allocated) with the adapter injected,
to count parameters. No data is read and nothing is written: not the run folder, not a model cache.
"""

from __future__ import annotations

from typing import Any

import moreft
from moreft.errors import MoreftError
from moreft.tasks import TaskKind, get_task
from moreft.train.config import TrainConfig


def _skeleton(config: TrainConfig, kind: TaskKind, num_labels: int | None) -> tuple[Any, str | None]:
    """``(meta model, None)``, or ``(None, why not)`` when the model cannot be read on this machine."""
    from moreft.models import model_skeleton

    try:
        return model_skeleton(config.model, kind, num_labels), None
    except (MoreftError, OSError) as exc:  # a recipe's model path that only exists on the GPU machine
        return None, f"{type(exc).__name__}: {exc}"


def describe_run(config: TrainConfig) -> str:
    """The plan of ``config``'s run in a few lines (parameters, steps, tokens), for ``--dry-run``.

    Every line is a YAML comment (``# ...``), so the dry run's output, the resolved config followed by
    the plan, still reads as a recipe.

    Raises:
        ConfigError: ``trainer_args`` that transformers refuses, or adapter settings that do not fit
            the model (e.g. ``nblocks`` wider than a targeted layer).
        moreft.TargetError: ``target_modules`` matches nothing.
    """
    from moreft.train.loop import training_arguments
    from moreft.train.rundir import model_defaults
    from moreft.train.weights import adapter_for

    training_arguments(config)  # checks trainer_args; builds no folder
    task = get_task(config.task, **config.task_options)
    lines = ["plan (dry run: no data read, no weights loaded, nothing written)"]
    model, why = _skeleton(config, task.kind, task.num_labels)
    if model is None:
        lines.append(f"model {config.model}: not readable here, parameters not counted ({why})")
    else:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        shape = getattr(model, "config", None)
        dims = (
            f" (hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, vocabulary {shape.vocab_size:,})"
            if shape is not None and hasattr(shape, "num_hidden_layers")
            else ""
        )
        lines.append(f"model {config.model}: {total:,} parameters{dims}")
        if config.full:
            lines.append(f"method full: every parameter trains ({total:,}); no adapter")
        else:
            targets, heads = model_defaults(config.model, model, task.kind)
            adapter = adapter_for(config, model, targets, heads)
            moreft.inject(model, adapter)
            counts = moreft.count_parameters(model)
            saved = list(adapter.modules_to_save)
            shown = ", ".join(saved[:4]) + (f", ... ({len(saved)} modules)" if len(saved) > 4 else "")
            lines.append(
                f"method {config.method_label()} on {len(moreft.adapter_layers(model))} layers: "
                f"{counts.adapter:,} adapter parameters"
                + (f" + {counts.other_trainable:,} trained in full ({shown})" if saved else "")
            )
    per_step = config.batch_size * config.grad_accum
    unit = f"blocks of {config.max_length} tokens" if task.kind is TaskKind.LANGUAGE_MODELING else "examples"
    if config.max_steps:
        lines.append(
            f"optimizer steps: {config.max_steps:,}, each {config.batch_size} x {config.grad_accum} = "
            f"{per_step:,} {unit} per process"
        )
        if task.kind is TaskKind.LANGUAGE_MODELING:
            tokens = config.max_steps * per_step * config.max_length
            lines.append(
                f"tokens trained on: {tokens:,} per process (past the data's size, its blocks repeat "
                "in another epoch)"
            )
    else:
        lines.append(
            f"training: {config.epochs:g} epoch(s), {per_step:,} {unit} per step per process (the number "
            "of steps depends on the data, not read in a dry run)"
        )
    if config.merge_every and config.max_steps:
        lines.append(
            f"merges: every {config.merge_every} steps, {(config.max_steps - 1) // config.merge_every} in "
            "all (none at the last step)"
        )
    lines.append(f"run folder: {config.run_dir} (not created)")
    return "\n".join(f"# {line}" for line in lines)
