"""``--merge-every K``: merge-and-reinit during training (ReLoRA / ReMoRA) for any adapter and model.

Every ``K`` optimizer steps each adapter is merged into its base weight and re-initialised
(:func:`moreft.remora.merge_and_reinit`: MoRA SHARING layers also switch between the STRIDED and
ADJACENT groupings, so the accumulated update reaches a higher rank, MoRA Appendix B), the
optimizer moments of the adapter parameters are dropped, and the learning rate restarts with a
short linear warmup on top of the run's schedule (ReLoRA's *jagged* schedule).

Only SHARING (with the layout switch), LoRA and MoRe gain rank from merging: a ROTATION, DECOUPLE
or TRUNCATION update has a fixed structure (``M`` repeated on the diagonal, or one corner), and a
sum of such updates has the same structure. MoRe keeps its fixed permutations; its first factor is
re-drawn at random each cycle, which is what lets the accumulated rank grow past ``nblocks * block_rank``.

What is saved: after a merge the earlier cycles live in the base weights, so the adapter alone is
no longer the whole update. The adapted layers' current base weights are written to
``merged_base.safetensors`` next to the adapter, in each checkpoint (so ``--resume`` restores them)
and in the run directory at the end; :func:`apply_merged_base` puts them into a freshly loaded base
model, which is what ``moreft eval`` / ``merge`` do before loading the adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from transformers import TrainerCallback

import moreft
from moreft.errors import ConfigError
from moreft.layers import AdapterLayer
from moreft.remora import RemoraCycle, merge_and_reinit, reset_optimizer_state
from moreft.safe_write import atomic_write_bytes

MERGED_BASE_FILE = "merged_base.safetensors"
#: ReLoRA / ReMoRA restart warmup (MoRA paper, Section 5.3: "50 steps restarts warmup").
PAPER_RESTART_WARMUP = 50
#: The default restart warmup is at most this fraction of a cycle.
MAX_WARMUP_FRACTION = 10


def default_merge_warmup(merge_every: int) -> int:
    """``min(50, merge_every // 10)``: the papers' 50 steps, shortened for short cycles."""
    return min(PAPER_RESTART_WARMUP, merge_every // MAX_WARMUP_FRACTION)


def restart_factor(step: int, merge_every: int, warmup: int) -> float:
    """Multiplier of the learning rate used for the update after ``step`` optimizer steps.

    1 during the first cycle; after the merge at step ``m`` (a multiple of ``merge_every``) it
    climbs linearly, ``(step - m + 1) / (warmup + 1)``, back to 1 over ``warmup`` steps. A pure
    function of the step, so a resumed run gets the same schedule.
    """
    if warmup <= 0 or step < merge_every:
        return 1.0
    return min(1.0, (step % merge_every + 1) / (warmup + 1))


def jagged(schedule: Callable[[int], float], merge_every: int, warmup: int) -> Callable[[int], float]:
    """``schedule(step) * restart_factor(step)``: the run's schedule with a warmup after each merge."""

    def lr_lambda(step: int) -> float:
        return schedule(step) * restart_factor(step, merge_every, warmup)

    lr_lambda.jagged = True  # type: ignore[attr-defined]  # a plain function: LambdaLR does not save it
    return lr_lambda


def official_restarts(
    schedule: Callable[[int], float], merge_every: int, warmup: int, max_steps: int
) -> Callable[[int], float]:
    """The authors' ReMoRA schedule restart as a pure function of the step (kongds/MoRA).

    Their ``ResetReloraCallback.on_step_end`` (train.py), after each merge at step ``m``, rewrites
    the transformers schedule's ``num_warmup_steps`` to ``warmup`` and ``num_training_steps`` to
    ``max_steps - m``, sets the scheduler back to epoch 0 and its base lr to the current lr. So the
    update right after the merge still runs at the current lr ``S = f(m)``, and step ``m + j``
    (``j >= 1``) gets ``S * g(j)`` with ``g`` the same schedule shape restarted: a warmup ramp
    from ``1/warmup``, then the decay over the remaining steps.

    Args:
        schedule: the run's ``LambdaLR`` function: a ``functools.partial`` of a transformers
            schedule lambda with ``num_warmup_steps`` and ``num_training_steps`` keywords (linear,
            cosine, ...), as their code requires.
        merge_every: optimizer steps per cycle.
        warmup: restart warmup steps (theirs: 50).
        max_steps: the run's total optimizer steps.

    Raises:
        ConfigError: ``schedule`` is not such a partial (e.g. a constant schedule).
    """
    keywords = getattr(schedule, "keywords", None) or {}
    if not isinstance(schedule, functools.partial) or not {"num_warmup_steps", "num_training_steps"} <= set(
        keywords
    ):
        raise ConfigError(
            "merge_schedule='official' restarts a warmup-and-decay schedule (linear, cosine); the run's "
            f"learning-rate schedule {getattr(schedule, '__name__', schedule)!r} has no num_warmup_steps/"
            "num_training_steps to restart"
        )
    scales = {0: 1.0}  # merge step -> lr factor the restarted schedule starts from (S above)

    def restarted(merge: int, j: int) -> float:
        shape = functools.partial(
            schedule.func,
            *schedule.args,
            **{**keywords, "num_warmup_steps": warmup, "num_training_steps": max_steps - merge},
        )
        return schedule(j) if merge == 0 else scales[merge] * shape(j)

    def lr_lambda(step: int) -> float:
        merge = max(0, (step - 1) // merge_every * merge_every)  # the last merge before update step + 1
        merge = min(merge, (max_steps - 1) // merge_every * merge_every)  # none at or after the last step
        for m in range(
            max(scales) + merge_every, merge + 1, merge_every
        ):  # each restart starts where the last is
            scales[m] = restarted(m - merge_every, merge_every)
        return restarted(merge, step - merge)

    lr_lambda.jagged = True  # type: ignore[attr-defined]  # already restarts: on_train_begin keeps it
    return lr_lambda


def _base_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The wrapped linear layer of every adapter, by the adapter's qualified name."""
    return {name: layer.base_layer for name, layer in moreft.adapter_layers(model).items()}


def save_merged_base(model: torch.nn.Module, path: Path, step: int) -> Path:
    """Write the current base weights of the adapted layers (``{name}.weight``) to ``path``, atomically."""
    tensors = {
        f"{name}.weight": base.weight.detach().contiguous().cpu()
        for name, base in _base_layers(model).items()
    }
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt", "step": str(step)}))
    return path


@torch.no_grad()
def apply_merged_base(model: torch.nn.Module, path: Path) -> int:
    """Copy saved base weights into ``model`` (with or without an adapter injected).

    Returns:
        The number of layers written.

    Raises:
        moreft.AdapterFileError: The file is not readable safetensors, names a layer the model lacks, a
            shape differs, or a tensor is not floating point or holds NaN/Inf. Nothing is written then.
    """
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise moreft.AdapterFileError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    modules = dict(model.named_modules())
    targets = []
    for key, value in tensors.items():
        name = key.removesuffix(".weight")
        module = modules.get(name)
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(value.shape):
            got = "no such layer" if weight is None else f"shape {tuple(weight.shape)}"
            raise moreft.AdapterFileError(
                f"{str(path)!r}: {key} of shape {tuple(value.shape)} does not fit "
                f"the model ({got}); it belongs to another base model"
            )
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise moreft.AdapterFileError(
                f"{str(path)!r}: {key} is {value.dtype} or holds NaN/Inf values; merged "
                "base weights must be finite floating-point numbers"
            )
        targets.append((weight, value))
    for weight, value in targets:  # all checked first: a bad file leaves the model as it was
        weight.copy_(value.to(dtype=weight.dtype))
    return len(tensors)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


class MergeReinitCallback(TrainerCallback):
    """Merge and re-initialise every adapter each ``merge_every`` steps (see the module docstring).

    Args:
        merge_every: Optimizer steps per cycle, >= 1.
        warmup: Restart warmup steps after each merge (0: none).
        run_dir: Where ``merged_base.safetensors`` goes at the end of training.
        switch_sharing_layout: Step MoRA SHARING layouts at each merge (ReMoRA).
        cycle: The SHARING layouts stepped through (:class:`moreft.remora.RemoraCycle`).
        official_schedule: Restart the schedule and drop all optimizer state as the authors' code
            does (:func:`official_restarts`) instead of the jagged ramp and adapter-only reset.

    Raises:
        ConfigError: ``merge_every < 1``, ``warmup < 0`` or ``warmup >= merge_every`` (allowed with
            ``official_schedule``, as the authors' code allows it).
    """

    def __init__(
        self,
        merge_every: int,
        warmup: int,
        run_dir: Path,
        switch_sharing_layout: bool = True,
        cycle: RemoraCycle = RemoraCycle.ALTERNATE,
        official_schedule: bool = False,
    ) -> None:
        if merge_every < 1:
            raise ConfigError(f"merge_every={merge_every} must be an integer >= 1")
        if warmup < 0 or (warmup >= merge_every and not official_schedule):
            raise ConfigError(f"merge_warmup={warmup} must be >= 0 and < merge_every={merge_every}")
        self.merge_every = merge_every
        self.warmup = warmup
        self.run_dir = Path(run_dir)
        self.switch_sharing_layout = switch_sharing_layout
        self.cycle = RemoraCycle(cycle)
        self.official_schedule = official_schedule
        self.merges = 0

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, lr_scheduler: Any = None, **kwargs: Any
    ) -> None:
        """Make the schedule jagged; on resume past a merge, restore the merged base weights.

        Raises:
            ConfigError: The scheduler is not a ``LambdaLR``, or the checkpoint resumed from has
                no ``merged_base.safetensors``.
        """
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ConfigError(
                f"merge_every needs a LambdaLR learning-rate schedule to restart; the trainer "
                f"built a {type(lr_scheduler).__name__}"
            )
        lr_scheduler.lr_lambdas = [
            f
            if getattr(f, "jagged", False)
            else (
                official_restarts(f, self.merge_every, self.warmup, state.max_steps)
                if self.official_schedule
                else jagged(f, self.merge_every, self.warmup)
            )
            for f in lr_scheduler.lr_lambdas
        ]
        if state.global_step >= self.merge_every:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = checkpoint / MERGED_BASE_FILE
            if not path.is_file():
                raise ConfigError(
                    f"cannot resume a merge_every={self.merge_every} run from {str(checkpoint)!r}: "
                    f"it has no {MERGED_BASE_FILE}, so the {state.global_step // self.merge_every} "
                    "merged cycles are lost; start over with --overwrite"
                )
            apply_merged_base(model, path)
            self.merges = state.global_step // self.merge_every

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        """After every ``merge_every``-th step (but the last): merge, re-init, reset the moments."""
        if state.global_step % self.merge_every or state.global_step >= state.max_steps:
            return
        params = merge_and_reinit(model, switch_sharing_layout=self.switch_sharing_layout, cycle=self.cycle)
        optimizer = _unwrap_optimizer(optimizer)
        if self.official_schedule:  # their fine-tuning branch: `optimizer.state = defaultdict(dict)`
            params = [p for group in optimizer.param_groups for p in group["params"]]
        reset_optimizer_state(optimizer, params)
        self.merges += 1

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Put the merged base weights into the checkpoint the Trainer just wrote."""
        if self.merges and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_merged_base(model, checkpoint / MERGED_BASE_FILE, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Write ``merged_base.safetensors`` into the run directory (next to the final adapter)."""
        if self.merges and state.is_world_process_zero:
            save_merged_base(model, self.run_dir / MERGED_BASE_FILE, state.global_step)


def merge_callbacks(config: Any, run_dir: Path) -> list[TrainerCallback]:
    """``[MergeReinitCallback]`` if ``config.merge_every`` is set, else ``[]`` (used by ``train``)."""
    if not config.merge_every:
        return []
    official = getattr(config, "merge_schedule", "jagged") == "official"
    if config.merge_warmup is not None:
        warmup = config.merge_warmup
    else:
        warmup = PAPER_RESTART_WARMUP if official else default_merge_warmup(config.merge_every)
    return [
        MergeReinitCallback(
            config.merge_every,
            warmup,
            run_dir,
            cycle=RemoraCycle(getattr(config, "merge_cycle", "alternate")),
            official_schedule=official,
        )
    ]
